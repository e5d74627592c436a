// A real OpenID Provider (the `oidc-provider` package) shaped like a Keycloak realm, on an ephemeral loopback port.
//
// Layout, as Keycloak serves it:
//   issuer     http://127.0.0.1:<port>/realms/<realm>
//   discovery  ${issuer}/.well-known/openid-configuration
//   jwks_uri   ${issuer}/protocol/openid-connect/certs
//   token      ${issuer}/protocol/openid-connect/token
//
// Every caller is a client_credentials client: the adapter answers for ANY client id matching SUB_PATTERN with the
// shared TEST_CLIENT_SECRET, so `sub` (= client id) needs no registration. Per-token roles, username, ttl and audience
// travel as extra form fields of the token request; oidc-provider strips unknown fields from `ctx.oidc.params` but keeps
// the parsed body in `ctx.oidc.body`, where `extraTokenClaims` and `getResourceServerInfo` read them. The token is
// still minted and signed by the provider's own token endpoint.
//
// Back-Channel Logout (OIDC Back-Channel Logout 1.0), as Keycloak does it for a login client: two dedicated client
// ids, LOGOUT_CLIENT_ID (backchannel_logout_session_required: true, the token carries `sid`) and
// LOGOUT_SUB_ONLY_CLIENT_ID (false: `sub` only), POST their logout tokens to the URI a test sets with
// setBackchannelLogoutUri(). backchannelLogout() makes the provider itself sign and POST one (oidc-provider's own
// Client#backchannelLogout: header typ logout+jwt, events, jti, aud = the client id, iat, exp = iat + 120, iss, sub,
// sid when session required). The provider's SSRF guard refuses loopback addresses; the `fetch` override removes it.
// Access tokens model a login session through TokenOptions.sid (claim `sid`, with `azp` = LOGOUT_CLIENT_ID as in a
// Keycloak token of that client). logoutToken() signs any logout-shaped payload for the invalid cases.
import { AsyncLocalStorage } from 'node:async_hooks'
import { createPrivateKey, generateKeyPair, randomBytes, sign as rsaSign, type KeyObject } from 'node:crypto'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { promisify } from 'node:util'
import { base64url, calculateJwkThumbprint, type JWK } from 'jose'

export interface TokenOptions {
  sub?: string
  realmRoles?: string[]
  clientRoles?: Record<string, string[]>
  username?: string
  ttlSeconds?: number
  audience?: string
  /** Claim `sid` (a Keycloak user-session id). With it, `azp` defaults to LOGOUT_CLIENT_ID. */
  sid?: string
  /** Claim `azp` (Keycloak: the client the user logged in to); default: LOGOUT_CLIENT_ID with `sid`, else the sub. */
  azp?: string
}

/** What a back-channel logout POST made by the provider came to. */
export interface BackchannelLogoutResult {
  /** The receiver answered 200 or 204 (the provider's own success test). */
  ok: boolean
  /** The receiver's HTTP status; undefined when no answer came (connection refused, 2.5 s timeout). */
  status: number | undefined
  /** The provider's error message when not ok, e.g. "expected 200 OK from <uri>, got: 400 Bad Request". */
  error: string | undefined
  /** The logout token the provider sent (undefined when it failed before the POST). */
  logoutToken: string | undefined
  /** Date.now() when the provider started the POST (after signing), and when the answer (or failure) came. */
  postedAt: number | undefined
  answeredAt: number
}

export interface BackchannelLogoutOptions {
  sub: string
  /** Sent only by a client with backchannel_logout_session_required (LOGOUT_CLIENT_ID, not LOGOUT_SUB_ONLY_CLIENT_ID). */
  sid?: string
  /** Default LOGOUT_CLIENT_ID. */
  clientId?: string
  /** Called with Date.now() at the moment the provider starts the POST. */
  onPost?: (at: number) => void
}

// 'error': HTTP 500; 'unavailable': HTTP 503 with Retry-After (an overloaded or restarting Keycloak);
// 'hang': accept and never answer; 'drop': close the connection without any answer (a crashing proxy in front).
export type JwksMode = 'ok' | 'error' | 'hang' | 'unavailable' | 'drop'

export interface TestIssuer {
  issuer: string
  jwksUrl: string
  audience: string
  token (opts?: TokenOptions): Promise<string>
  /**
   * Signs an arbitrary payload with the CURRENT real private signing key (RS256). The header is
   * `{ alg: 'RS256', typ: 'JWT', kid: currentKid() }` merged with `header`, so it may override (even lie about)
   * any field, or drop it with an undefined value; the signature is always RS256 over exactly the header and payload
   * given.
   */
  sign (payload: Record<string, unknown>, header?: Record<string, unknown>): Promise<string>
  currentKid (): string
  publicKeyPem (): string
  rotate (): Promise<void>
  dropOldKeys (): Promise<void>
  setJwksMode (mode: JwksMode): void
  /**
   * Where the provider POSTs logout tokens for LOGOUT_CLIENT_ID and LOGOUT_SUB_ONLY_CLIENT_ID (registered as their
   * backchannel_logout_uri); undefined unregisters it. Also settable with startIssuer({ backchannelLogoutUri }).
   */
  setBackchannelLogoutUri (uri: string | undefined): void
  /**
   * The provider itself signs a logout token for `clientId` (default LOGOUT_CLIENT_ID) and POSTs it to the back-channel
   * logout URI. Resolves with what happened; never rejects for a refusal or a network error (rejects only when no URI
   * is set or the client id is not valid).
   */
  backchannelLogout (opts: BackchannelLogoutOptions): Promise<BackchannelLogoutResult>
  /**
   * A logout token signed with the current key (via sign()). Defaults are what the provider sends for LOGOUT_CLIENT_ID:
   * header `{ alg: 'RS256', typ: 'logout+jwt', kid }`, payload `{ iss, aud: LOGOUT_CLIENT_ID, sub: DEFAULT_SUB,
   * sid: <random>, iat: now, exp: now + 120, jti: <random>, events: { [BACKCHANNEL_LOGOUT_EVENT]: {} } }`. `claims`
   * and `header` are merged over them; an `undefined` value deletes that member (e.g. `{ events: undefined }`,
   * header `{ typ: undefined }`).
   */
  logoutToken (claims?: Record<string, unknown>, header?: Record<string, unknown>): Promise<string>
  readonly stats: { discovery: number, jwks: number }
  close (): Promise<void>
}

export const DEFAULT_REALM = 'resonance'
export const DEFAULT_AUDIENCE = 'resonance-gateway'
export const DEFAULT_SUB = 'test-user'
export const DEFAULT_TTL_SECONDS = 300
export const TEST_CLIENT_SECRET = 'test-client-secret-shared-by-every-client'
export const TOKEN_SCOPE = 'profile email'
/** The login client whose logout tokens carry `sid` (backchannel_logout_session_required: true). */
export const LOGOUT_CLIENT_ID = 'resonance-web'
/** A login client whose logout tokens carry `sub` only (backchannel_logout_session_required: false). */
export const LOGOUT_SUB_ONLY_CLIENT_ID = 'resonance-web-sub-only'
/** The member of `events` that makes a JWT a logout token. */
export const BACKCHANNEL_LOGOUT_EVENT = 'http://schemas.openid.net/event/backchannel-logout'
/** What Keycloak and oidc-provider put between a logout token's iat and exp. */
export const LOGOUT_TOKEN_TTL_SECONDS = 120
const SUB_PATTERN = /^[A-Za-z0-9._-]+$/
// oidc-provider needs an absolute URI as resource indicator; the audience itself comes from getResourceServerInfo.
const RESOURCE_INDICATOR = 'urn:resonance:test-resource'

const DISCOVERY_PATH = '/.well-known/openid-configuration'
const ROUTES = {
  authorization: '/protocol/openid-connect/auth',
  token: '/protocol/openid-connect/token',
  userinfo: '/protocol/openid-connect/userinfo',
  jwks: '/protocol/openid-connect/certs',
  end_session: '/protocol/openid-connect/logout',
  introspection: '/protocol/openid-connect/token/introspect',
  revocation: '/protocol/openid-connect/revoke',
  pushed_authorization_request: '/protocol/openid-connect/ext/par/request'
}

// Extra token-request form fields (see the header comment).
const PARAM = {
  realmRoles: 'x_realm_roles',
  clientRoles: 'x_client_roles',
  username: 'x_username',
  ttl: 'x_ttl',
  audience: 'x_audience',
  sid: 'x_sid',
  azp: 'x_azp'
} as const

// --- the minimal slice of oidc-provider's (untyped) API used here -------------------------------------------------

interface ProviderContext {
  oidc?: { body?: Record<string, unknown> }
}
interface ProviderToken {
  clientId?: string
}
interface ProviderClient {
  backchannelLogout (sub: string, sid: string | undefined): Promise<void>
}
interface OidcProvider {
  callback (): (req: http.IncomingMessage, res: http.ServerResponse) => void
  on (event: string, listener: (...args: unknown[]) => void): unknown
  Client: { find (id: string): Promise<ProviderClient | undefined> }
}
type ProviderConstructor = new (issuer: string, configuration: Record<string, unknown>) => OidcProvider

let providerModule: Promise<ProviderConstructor> | undefined

// oidc-provider 9 prints "Unsupported runtime" on Node 20 when its module is evaluated. Import it lazily, with that
// one console.warn line filtered out. The specifier is a variable so that tsc does not look for (absent) typings.
function loadProvider (): Promise<ProviderConstructor> {
  providerModule ??= (async () => {
    const specifier = 'oidc-provider'
    const warn = console.warn
    console.warn = (...args: unknown[]) => {
      if (typeof args[0] === 'string' && args[0].includes('Unsupported runtime')) return
      warn.apply(console, args)
    }
    try {
      const mod = await import(specifier) as { default: ProviderConstructor }
      return mod.default
    } finally {
      console.warn = warn
    }
  })()
  return providerModule
}

// --- keys ---------------------------------------------------------------------------------------------------------

interface SigningKey {
  kid: string
  privateJwk: JWK
  publicPem: string
}

const generateRsa = promisify(generateKeyPair)

async function newSigningKey (): Promise<SigningKey> {
  const { privateKey, publicKey } = await generateRsa('rsa', { modulusLength: 2048 }) as {
    privateKey: KeyObject
    publicKey: KeyObject
  }
  const jwk = privateKey.export({ format: 'jwk' }) as JWK
  const kid = await calculateJwkThumbprint(jwk)
  return {
    kid,
    privateJwk: { ...jwk, kid, alg: 'RS256', use: 'sig' },
    publicPem: publicKey.export({ type: 'spki', format: 'pem' }).toString()
  }
}

// --- adapter: answers for any client id, stores the rest in memory ------------------------------------------------

function clientMetadata (clientId: string, backchannelLogoutUri: string | undefined): Record<string, unknown> {
  const metadata: Record<string, unknown> = {
    client_id: clientId,
    client_secret: TEST_CLIENT_SECRET,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic'
  }
  if (clientId === LOGOUT_CLIENT_ID || clientId === LOGOUT_SUB_ONLY_CLIENT_ID) {
    metadata.backchannel_logout_session_required = clientId === LOGOUT_CLIENT_ID
    if (backchannelLogoutUri !== undefined) metadata.backchannel_logout_uri = backchannelLogoutUri
  }
  return metadata
}

function createAdapter (logoutUri: () => string | undefined) {
  // shared by every provider instance this issuer builds (rotation rebuilds the provider)
  const store = new Map<string, { payload: Record<string, unknown>, expiresAt: number }>()
  const live = (key: string) => {
    const entry = store.get(key)
    if (entry === undefined) return undefined
    if (entry.expiresAt <= Date.now()) {
      store.delete(key)
      return undefined
    }
    return entry
  }

  return class TestAdapter {
    readonly model: string
    constructor (model: string) {
      this.model = model
    }

    async upsert (id: string, payload: Record<string, unknown>, expiresIn?: number): Promise<void> {
      const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity
      store.set(`${this.model}:${id}`, { payload, expiresAt })
    }

    async find (id: string): Promise<Record<string, unknown> | undefined> {
      if (this.model === 'Client') return SUB_PATTERN.test(id) ? clientMetadata(id, logoutUri()) : undefined
      return live(`${this.model}:${id}`)?.payload
    }

    async findByUserCode (): Promise<undefined> {
      return undefined
    }

    async findByUid (): Promise<undefined> {
      return undefined
    }

    async consume (id: string): Promise<void> {
      const entry = live(`${this.model}:${id}`)
      if (entry !== undefined) entry.payload.consumed = Math.floor(Date.now() / 1000)
    }

    async destroy (id: string): Promise<void> {
      store.delete(`${this.model}:${id}`)
    }

    async revokeByGrantId (grantId: string): Promise<void> {
      for (const [key, entry] of store) {
        if (entry.payload.grantId === grantId) store.delete(key)
      }
    }
  }
}

// --- per-token parameters read back from the token request body ---------------------------------------------------

function bodyParam (ctx: ProviderContext, name: string): string | undefined {
  const value = ctx.oidc?.body?.[name]
  return typeof value === 'string' && value !== '' ? value : undefined
}

function jsonParam<T> (ctx: ProviderContext, name: string): T | undefined {
  const value = bodyParam(ctx, name)
  return value === undefined ? undefined : JSON.parse(value) as T
}

// --- the issuer ---------------------------------------------------------------------------------------------------

// One provider-driven back-channel POST in flight: the fetch override fills it in (found through AsyncLocalStorage, so
// concurrent calls do not mix; a POST the provider makes on its own, e.g. from end_session, has none).
interface PostRecord { postedAt?: number, status?: number, logoutToken?: string, onPost?: (at: number) => void }

function logoutTokenOf (body: unknown): string | undefined {
  if (body instanceof URLSearchParams) return body.get('logout_token') ?? undefined
  if (typeof body === 'string') return new URLSearchParams(body).get('logout_token') ?? undefined
  return undefined
}

function merged (base: Record<string, unknown>, over: Record<string, unknown>): Record<string, unknown> {
  const out = { ...base }
  for (const [name, value] of Object.entries(over)) {
    if (value === undefined) delete out[name]
    else out[name] = value
  }
  return out
}

export interface IssuerOptions {
  realm?: string
  audience?: string
  /** The initial back-channel logout URI of LOGOUT_CLIENT_ID and LOGOUT_SUB_ONLY_CLIENT_ID (see setBackchannelLogoutUri). */
  backchannelLogoutUri?: string
}

export async function startIssuer (opts: IssuerOptions = {}): Promise<TestIssuer> {
  const realm = opts.realm ?? DEFAULT_REALM
  const audience = opts.audience ?? DEFAULT_AUDIENCE
  if (!SUB_PATTERN.test(realm)) throw new TypeError(`startIssuer: invalid realm name ${JSON.stringify(realm)}`)

  const Provider = await loadProvider()
  let backchannelLogoutUri = opts.backchannelLogoutUri
  const Adapter = createAdapter(() => backchannelLogoutUri)
  const posts = new AsyncLocalStorage<PostRecord>()
  const prefix = `/realms/${realm}`

  let keys: SigningKey[] = [await newSigningKey()]
  let mode: JwksMode = 'ok'
  const stats = { discovery: 0, jwks: 0 }
  const hanging = new Set<http.ServerResponse>()
  let lastServerError: unknown
  let closing: Promise<void> | undefined
  let handler: ((req: http.IncomingMessage, res: http.ServerResponse) => void) | undefined

  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0] ?? '/'
    if (path !== prefix && !path.startsWith(`${prefix}/`)) {
      res.writeHead(404, { 'content-type': 'application/json' }).end('{"error":"Realm does not exist"}')
      return
    }
    const rest = path.slice(prefix.length)
    const isDiscovery = rest === DISCOVERY_PATH
    const isJwks = rest === ROUTES.jwks
    if (isDiscovery) stats.discovery++
    if (isJwks) stats.jwks++

    if ((isDiscovery || isJwks) && mode !== 'ok') {
      if (mode === 'hang') {
        // accept and never answer; close() destroys the socket
        hanging.add(res)
        res.on('close', () => hanging.delete(res))
        return
      }
      if (mode === 'drop') {
        req.socket.destroy()
        return
      }
      if (mode === 'unavailable') {
        res.writeHead(503, { 'content-type': 'text/html', 'retry-after': '1' }).end('<html><body>503 Service Unavailable</body></html>')
        return
      }
      res.writeHead(500, { 'content-type': 'application/json' }).end('{"error":"injected failure"}')
      return
    }

    if (handler === undefined) {
      res.writeHead(503).end()
      return
    }
    // Mount the provider under /realms/<realm>: oidc-provider derives its mount path from originalUrl vs url.
    Object.assign(req, { originalUrl: req.url })
    req.url = (req.url ?? '/').slice(prefix.length) || '/'
    handler(req, res)
  })
  server.keepAliveTimeout = 1_000

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject)
      resolve()
    })
  })
  const { port } = server.address() as AddressInfo
  const issuer = `http://127.0.0.1:${port}${prefix}`

  const current = (): SigningKey => {
    const key = keys[0]
    if (key === undefined) throw new Error('issuer has no signing key')
    return key
  }

  // Keycloak-like rotation = a new provider whose first signing key is the new one; older keys stay published.
  let provider: OidcProvider | undefined
  const build = () => {
    const next = new Provider(issuer, {
      adapter: Adapter,
      jwks: { keys: keys.map((k) => k.privateJwk) },
      routes: ROUTES,
      clients: [],
      scopes: ['openid', 'offline_access', 'profile', 'email'],
      features: {
        devInteractions: { enabled: false },
        clientCredentials: { enabled: true },
        introspection: { enabled: false },
        revocation: { enabled: false },
        backchannelLogout: { enabled: true },
        resourceIndicators: {
          enabled: true,
          defaultResource: async () => RESOURCE_INDICATOR,
          getResourceServerInfo: async (ctx: ProviderContext) => {
            const ttl = bodyParam(ctx, PARAM.ttl)
            return {
              scope: TOKEN_SCOPE,
              audience: bodyParam(ctx, PARAM.audience) ?? audience,
              accessTokenFormat: 'jwt',
              accessTokenTTL: ttl === undefined ? DEFAULT_TTL_SECONDS : Number(ttl),
              jwt: { sign: { alg: 'RS256', kid: current().kid } }
            }
          }
        }
      },
      ttl: {
        ClientCredentials: (_ctx: unknown, token: { resourceServer?: { accessTokenTTL?: number } }) =>
          token.resourceServer?.accessTokenTTL ?? DEFAULT_TTL_SECONDS
      },
      // The provider's outgoing requests (back-channel logout POSTs): without its SSRF guard, which refuses loopback
      // addresses, and recorded for backchannelLogout().
      fetch: async (url: string | URL, options: RequestInit & { dispatcher?: unknown }) => {
        delete options.dispatcher
        const record = posts.getStore()
        if (record !== undefined) {
          record.postedAt = Date.now()
          record.logoutToken = logoutTokenOf(options.body)
          record.onPost?.(record.postedAt)
        }
        const res = await globalThis.fetch(url, options)
        if (record !== undefined) record.status = res.status
        return res
      },
      extraTokenClaims: async (ctx: ProviderContext, token: ProviderToken) => {
        const sid = bodyParam(ctx, PARAM.sid)
        const claims: Record<string, unknown> = {
          typ: 'Bearer',
          azp: bodyParam(ctx, PARAM.azp) ?? (sid !== undefined ? LOGOUT_CLIENT_ID : token.clientId),
          realm_access: { roles: jsonParam<string[]>(ctx, PARAM.realmRoles) ?? [] }
        }
        const clientRoles = jsonParam<Record<string, string[]>>(ctx, PARAM.clientRoles)
        if (clientRoles !== undefined) {
          claims.resource_access = Object.fromEntries(
            Object.entries(clientRoles).map(([client, roles]) => [client, { roles }]))
        }
        const username = bodyParam(ctx, PARAM.username)
        if (username !== undefined) claims.preferred_username = username
        if (sid !== undefined) claims.sid = sid
        return claims
      },
      formats: {
        customizers: {
          // Keycloak's access tokens carry `typ: JWT` in the header (oidc-provider would write RFC 9068 `at+jwt`)
          jwt: async (_ctx: unknown, _token: unknown, jwt: { header?: Record<string, unknown> }) => {
            jwt.header = { ...jwt.header, typ: 'JWT' }
          }
        }
      },
      clientBasedCORS: () => false,
      renderError: async (ctx: { type: string, body: unknown }, out: unknown) => {
        ctx.type = 'application/json'
        ctx.body = out
      }
    })
    next.on('server_error', (_ctx: unknown, err: unknown) => { lastServerError = err })
    handler = next.callback()
    provider = next
  }
  build()

  const tokenUrl = `${issuer}${ROUTES.token}`

  // The header is `{ alg: 'RS256', typ: 'JWT', kid }` merged with `header`; an undefined value there drops the member.
  async function sign (payload: Record<string, unknown>, header: Record<string, unknown> = {}): Promise<string> {
    const key = current()
    const fullHeader = merged({ alg: 'RS256', typ: 'JWT', kid: key.kid }, header)
    const signingInput = `${base64url.encode(JSON.stringify(fullHeader))}.${base64url.encode(JSON.stringify(payload))}`
    const privateKey = createPrivateKey({ key: { ...key.privateJwk }, format: 'jwk' })
    return `${signingInput}.${base64url.encode(rsaSign('sha256', Buffer.from(signingInput), privateKey))}`
  }

  return {
    issuer,
    jwksUrl: `${issuer}${ROUTES.jwks}`,
    audience,
    stats,

    async token (o: TokenOptions = {}): Promise<string> {
      const sub = o.sub ?? DEFAULT_SUB
      if (!SUB_PATTERN.test(sub)) throw new TypeError(`token: sub must match ${SUB_PATTERN}, got ${JSON.stringify(sub)}`)
      if (o.ttlSeconds !== undefined && (!Number.isSafeInteger(o.ttlSeconds) || o.ttlSeconds < 1)) {
        throw new TypeError(`token: ttlSeconds must be an integer >= 1, got ${o.ttlSeconds}`)
      }
      const form = new URLSearchParams({ grant_type: 'client_credentials', scope: TOKEN_SCOPE })
      if (o.realmRoles !== undefined) form.set(PARAM.realmRoles, JSON.stringify(o.realmRoles))
      if (o.clientRoles !== undefined) form.set(PARAM.clientRoles, JSON.stringify(o.clientRoles))
      if (o.username !== undefined) form.set(PARAM.username, o.username)
      if (o.ttlSeconds !== undefined) form.set(PARAM.ttl, String(o.ttlSeconds))
      if (o.audience !== undefined) form.set(PARAM.audience, o.audience)
      if (o.sid !== undefined) form.set(PARAM.sid, o.sid)
      if (o.azp !== undefined) form.set(PARAM.azp, o.azp)

      const basic = Buffer.from(`${encodeURIComponent(sub)}:${encodeURIComponent(TEST_CLIENT_SECRET)}`).toString('base64')
      const res = await fetch(tokenUrl, {
        method: 'POST',
        headers: { authorization: `Basic ${basic}`, 'content-type': 'application/x-www-form-urlencoded' },
        body: form
      })
      const body = await res.json() as { access_token?: unknown, error?: string, error_description?: string }
      if (!res.ok || typeof body.access_token !== 'string') {
        const cause = res.status >= 500 ? lastServerError : undefined
        throw new Error(`token endpoint answered ${res.status}: ${body.error ?? ''} ${body.error_description ?? ''}`.trim(),
          { cause })
      }
      return body.access_token
    },

    sign,

    currentKid: () => current().kid,
    publicKeyPem: () => current().publicPem,

    async rotate (): Promise<void> {
      keys = [await newSigningKey(), ...keys]
      build()
    },

    async dropOldKeys (): Promise<void> {
      keys = [current()]
      build()
    },

    setJwksMode (next: JwksMode): void {
      mode = next
    },

    setBackchannelLogoutUri (uri: string | undefined): void {
      if (uri !== undefined) new URL(uri) // eslint-disable-line no-new -- throws on a malformed URI, here rather than in the provider
      backchannelLogoutUri = uri
    },

    async backchannelLogout (o: BackchannelLogoutOptions): Promise<BackchannelLogoutResult> {
      const clientId = o.clientId ?? LOGOUT_CLIENT_ID
      if (backchannelLogoutUri === undefined) throw new Error('backchannelLogout: no back-channel logout URI set (setBackchannelLogoutUri)')
      const p = provider
      if (p === undefined) throw new Error('issuer has no provider')
      const client = await p.Client.find(clientId)
      if (client === undefined) throw new TypeError(`backchannelLogout: no client ${JSON.stringify(clientId)}`)
      const record: PostRecord = { ...(o.onPost !== undefined ? { onPost: o.onPost } : {}) }
      let error: string | undefined
      try {
        await posts.run(record, () => client.backchannelLogout(o.sub, o.sid))
      } catch (err) {
        const cause = err instanceof Error && err.cause instanceof Error ? ` (${err.cause.message})` : ''
        error = err instanceof Error ? `${err.message}${cause}` : String(err)
      }
      return {
        ok: error === undefined,
        status: record.status,
        error,
        logoutToken: record.logoutToken,
        postedAt: record.postedAt,
        answeredAt: Date.now()
      }
    },

    async logoutToken (over: Record<string, unknown> = {}, header: Record<string, unknown> = {}): Promise<string> {
      const now = Math.floor(Date.now() / 1000)
      const payload = merged({
        iss: issuer,
        aud: LOGOUT_CLIENT_ID,
        sub: DEFAULT_SUB,
        sid: randomBytes(12).toString('base64url'),
        iat: now,
        exp: now + LOGOUT_TOKEN_TTL_SECONDS,
        jti: randomBytes(16).toString('base64url'),
        events: { [BACKCHANNEL_LOGOUT_EVENT]: {} }
      }, over)
      // spread, not merged(): an undefined typ must reach sign() to drop its default 'JWT'
      return await sign(payload, { typ: 'logout+jwt', ...header })
    },

    close (): Promise<void> {
      closing ??= new Promise<void>((resolve) => {
        server.close(() => resolve())
        for (const res of hanging) res.destroy()
        hanging.clear()
        server.closeAllConnections()
      })
      return closing
    }
  }
}

// a fresh random string, handy for unique subs in tests
export function randomSub (prefix = 'user'): string {
  return `${prefix}-${randomBytes(6).toString('hex')}`
}
