/**
 * The warm-up's signing key and access tokens: a key pair made at start
 * (node:crypto, in the thread pool), published only by the warm-up's stub
 * issuer, and Keycloak-shaped tokens signed with it (fast-jwt). The real
 * gateway's key set never sees this key.
 */
import { generateKeyPair, randomBytes, type KeyObject } from 'node:crypto'
import { promisify } from 'node:util'
import { createSigner } from 'fast-jwt'

const generate = promisify(generateKeyPair) as (type: string, options: object) => Promise<{ publicKey: KeyObject, privateKey: KeyObject }>

export interface SigningKey {
  alg: string
  /** The public key set the stub issuer serves. */
  jwks: { keys: object[] }
  sign (payload: Record<string, unknown>): string
}

/** Key generation per algorithm family (RSA 2048 bits, as a Keycloak realm's default key). */
function keyParams (alg: string): [string, object] {
  if (alg.startsWith('RS') || alg.startsWith('PS')) return ['rsa', { modulusLength: 2048 }]
  if (alg === 'ES256') return ['ec', { namedCurve: 'prime256v1' }]
  if (alg === 'ES384') return ['ec', { namedCurve: 'secp384r1' }]
  if (alg === 'ES512') return ['ec', { namedCurve: 'secp521r1' }]
  return ['ed25519', {}]
}

/** A fresh key for RS256 when the gateway accepts it (Keycloak's default), else for its first allowed algorithm. */
export async function makeSigningKey (algorithms: readonly string[]): Promise<SigningKey> {
  const alg = algorithms.includes('RS256') ? 'RS256' : algorithms[0] ?? 'RS256'
  const [type, options] = keyParams(alg)
  const { publicKey, privateKey } = await generate(type, options)
  const kid = `warmup-${randomBytes(6).toString('hex')}`
  const jwk = { ...publicKey.export({ format: 'jwk' }), kid, alg, use: 'sig' }
  const signer = createSigner({ key: privateKey.export({ format: 'pem', type: 'pkcs8' }) as string, algorithm: alg as never, kid })
  return { alg, jwks: { keys: [jwk] }, sign: (payload) => signer(payload) }
}

/** What the warm-up's tokens carry besides their user: worked out from the gateway's configuration (index.ts). */
export interface TokenClaims {
  /** The first accepted audience. */
  audience: string
  /** Realm roles: every role the role rules ask for, except the rate-limit exempt ones (index.ts). */
  roles: string[]
  /** The `azp`, and the client whose resource_access roles the gateway reads (the first JWT_ROLE_CLIENTS entry). */
  client: string
  ttlSeconds: number
}

/** `count` tokens of distinct users, shaped as Keycloak access tokens. */
export function mintTokens (key: SigningKey, claims: TokenClaims & { issuer: string }, count: number): string[] {
  const now = Math.floor(Date.now() / 1000)
  const tokens: string[] = []
  for (let i = 0; i < count; i++) {
    tokens.push(key.sign({
      iss: claims.issuer,
      aud: claims.audience,
      sub: `warmup-user-${i}`,
      azp: claims.client,
      typ: 'Bearer',
      iat: now,
      exp: now + claims.ttlSeconds,
      jti: randomBytes(9).toString('base64url'),
      sid: randomBytes(9).toString('base64url'),
      preferred_username: `warmup-${i}`,
      realm_access: { roles: ['offline_access', 'default-roles-warmup', ...claims.roles] },
      resource_access: { [claims.client]: { roles: ['view'] } }
    }))
  }
  return tokens
}
