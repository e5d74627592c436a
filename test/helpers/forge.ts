// Attack-token forging for the gateway's rejection table (alg none, HS256 keyed with the public PEM, foreign keys…).
//
// jose encodes and generates keys; the signature itself is computed with node:crypto over the exact header given,
// because jose's signers refuse precisely the headers an attacker sends (an `alg` that differs from the signing alg,
// unknown `crit` entries, …).
import { createHmac, createPrivateKey, KeyObject, randomUUID, sign } from 'node:crypto'
import { base64url, exportJWK, generateKeyPair, type CryptoKey, type JWK } from 'jose'
import type { TestIssuer } from './issuer.js'

export type ForgeAlg = 'none' | 'HS256' | 'RS256' | 'ES256'
export type ForgeKey = CryptoKey | KeyObject | JWK | Uint8Array | string

export interface ForgeOptions {
  alg: ForgeAlg
  key?: ForgeKey
  header?: Record<string, unknown>
  payload: Record<string, unknown>
}

const encodeJson = (value: unknown): string => base64url.encode(JSON.stringify(value))

// HMAC takes raw bytes (a string is its UTF-8 bytes, even an empty one) or a secret key object
function hmacKey (key: ForgeKey): KeyObject | Uint8Array {
  if (typeof key === 'string') return Buffer.from(key, 'utf8')
  if (key instanceof Uint8Array || key instanceof KeyObject) return key
  if ('algorithm' in key) return KeyObject.from(key)
  return base64url.decode(key.k ?? '')
}

// a private key for RS256/ES256: PEM string, KeyObject, WebCrypto CryptoKey or private JWK
function privateKey (key: ForgeKey): KeyObject {
  if (typeof key === 'string') return createPrivateKey(key)
  if (key instanceof KeyObject) return key
  if (key instanceof Uint8Array) throw new TypeError('forgeToken: raw bytes can only key HS256')
  if ('algorithm' in key) return KeyObject.from(key)
  return createPrivateKey({ key: { ...key }, format: 'jwk' })
}

// `header` is merged over `{ alg, typ: 'JWT' }`, so it may lie: `{ alg: 'RS256', header: { alg: 'HS256' } }` signs
// with RS256 but announces HS256. A string key for HS256 is used as raw HMAC bytes (e.g. the issuer's public PEM:
// the classic alg-confusion attack).
export async function forgeToken (opts: ForgeOptions): Promise<string> {
  const header: Record<string, unknown> = { alg: opts.alg, typ: 'JWT', ...opts.header }
  const signingInput = `${encodeJson(header)}.${encodeJson(opts.payload)}`
  if (opts.alg === 'none') return `${signingInput}.`

  if (opts.key === undefined) throw new TypeError(`forgeToken: alg ${opts.alg} needs a key`)
  const data = Buffer.from(signingInput)
  let signature: Buffer
  if (opts.alg === 'HS256') {
    signature = createHmac('sha256', hmacKey(opts.key)).update(data).digest()
  } else if (opts.alg === 'RS256') {
    signature = sign('sha256', data, privateKey(opts.key))
  } else {
    // JWS wants the raw r||s form for ECDSA, not DER
    signature = sign('sha256', data, { key: privateKey(opts.key), dsaEncoding: 'ieee-p1363' })
  }
  return `${signingInput}.${base64url.encode(signature)}`
}

// a fresh RSA-2048 key pair the issuer has never seen
export async function foreignRsaKey (): Promise<{ privateKey: CryptoKey, publicJwk: JWK }> {
  const { privateKey, publicKey } = await generateKeyPair('RS256', { modulusLength: 2048, extractable: true })
  const publicJwk = await exportJWK(publicKey)
  return { privateKey, publicJwk: { ...publicJwk, alg: 'RS256', use: 'sig', kid: `foreign-${randomUUID()}` } }
}

// a valid-looking Keycloak access-token payload for `issuer`; `undefined` in `over` deletes a claim
export function claims (issuer: TestIssuer, over: Record<string, unknown> = {}): Record<string, unknown> {
  const now = Math.floor(Date.now() / 1000)
  const base: Record<string, unknown> = {
    iss: issuer.issuer,
    aud: issuer.audience,
    sub: 'forged-user',
    exp: now + 300,
    iat: now,
    jti: randomUUID(),
    azp: 'forged-user',
    typ: 'Bearer',
    scope: 'profile email',
    realm_access: { roles: [] }
  }
  for (const [name, value] of Object.entries(over)) {
    if (value === undefined) delete base[name]
    else base[name] = value
  }
  return base
}

/** `token` with one character of its signature changed: same header and payload, a signature that no longer fits. */
export function flipSignatureChar (token: string): string {
  const [h, p, s = ''] = token.split('.')
  // the middle of the signature: every bit there is significant (the last char carries padding bits)
  const i = Math.floor(s.length / 2)
  const c = s[i] === 'A' ? 'B' : 'A'
  return `${h}.${p}.${s.slice(0, i)}${c}${s.slice(i + 1)}`
}
