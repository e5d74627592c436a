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
//
// Real login sessions: login(sub) runs the authorization code flow (PKCE) of LOGOUT_CLIENT_ID headlessly through the
// provider's development interactions (a cookie jar; consent skipped by loadExistingGrant), so the provider holds a
// Session whose sid (Session#sidFor, one per session and client) lands in the access token (extraTokenClaims) and the
// ID token. Its logout() is RP-initiated logout (end_session: GET with id_token_hint, then POST .../logout/confirm with
// the xsrf and logout=yes): the provider itself POSTs a logout token to the back-channel logout URI of every client of
// that session before it answers its 303.
import { AsyncLocalStorage } from 'node:async_hooks'
import { createHash, createPrivateKey, generateKeyPair, randomBytes, sign as rsaSign, type KeyObject } from 'node:crypto'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { promisify } from 'node:util'
import { base64url, calculateJwkThumbprint, decodeJwt, type JWK } from 'jose'

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

/** A real login session at the provider (login()): tokens from the authorization code flow of LOGOUT_CLIENT_ID. */
export interface LoginSession {
  sub: string
  /** A JWT access token for the API audience, with `sid` and `azp` = LOGOUT_CLIENT_ID (typ JWT, as Keycloak's). */
  accessToken: string
  /** The ID token (aud LOGOUT_CLIENT_ID, the same `sid`). */
  idToken: string
  /** The provider's sid of this session for LOGOUT_CLIENT_ID: what its logout token will carry. */
  sid: string
  /**
   * RP-initiated logout of this session (end_session, confirmed with logout=yes). Resolves after the provider
   * answered its 303, which it sends only after its back-channel POSTs (to every client of the session with a
   * back-channel logout URI) were answered or failed. Rejects when the flow itself fails (not for a failed POST).
   * A second call returns the first call's promise (the session is gone; nothing is sent again).
   */
  logout (opts?: { onConfirm?: (at: number) => void }): Promise<EndSessionResult>
}

export interface EndSessionResult {
  /** Date.now() just before the confirmation (POST .../logout/confirm) was sent; also passed to onConfirm. */
  confirmSentAt: number
  /** Date.now() when the provider's answer (303) came. */
  answeredAt: number
  /** Where the 303 pointed (the provider's logout success page). */
  location: string
  /** The back-channel POSTs the provider made for this session, in order (none when no URI is set). */
  backchannel: BackchannelLogoutResult[]
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
  /**
   * A real login of `sub` (default DEFAULT_SUB) to LOGOUT_CLIENT_ID: authorization request, the development login
   * form, the code, the token request (PKCE, client_secret_basic). Each call is a new browser, so a new session (and
   * sid). The session's logout() ends it at the provider, which then POSTs the logout token itself. Needs a
   * back-channel logout URI (setBackchannelLogoutUri): oidc-provider puts a sid in the tokens only for a client with
   * one (and backchannel_logout_session_required); rejects without it.
   */
  login (sub?: string): Promise<LoginSession>
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
/** Where login() sends the browser back with the code (never fetched). */
export const LOGIN_REDIRECT_URI = `http://127.0.0.1/${LOGOUT_CLIENT_ID}/callback`
/** The scope login() asks for. */
export const LOGIN_SCOPE = `openid ${TOKEN_SCOPE}`
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
  /** An authorization-code access token: the session's sid for its client (client_credentials: none). */
  sid?: string
  resourceServer?: { accessTokenTTL?: number }
}
interface ProviderGrant {
  addOIDCScope (scope: string): void
  addResourceScope (resource: string, scope: string): void
  save (): Promise<string>
}
interface AuthorizationContext {
  oidc: {
    result?: { consent?: { grantId?: string } }
    session: { accountId: string, grantIdFor (clientId: string): string | undefined }
    client: { clientId: string }
    provider: {
      Grant: {
        new (init: { clientId: string, accountId: string }): ProviderGrant
        find (id: string): Promise<ProviderGrant | undefined>
      }
    }
  }
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
  if (clientId === LOGOUT_CLIENT_ID) {
    // login(): the authorization code flow, besides client_credentials
    metadata.grant_types = ['client_credentials', 'authorization_code']
    metadata.response_types = ['code']
    metadata.redirect_uris = [LOGIN_REDIRECT_URI]
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

    // Session lookups by the uid in the interaction (login()); only a live entry of this model.
    async findByUid (uid: string): Promise<Record<string, unknown> | undefined> {
      for (const key of store.keys()) {
        if (!key.startsWith(`${this.model}:`)) continue
        const entry = live(key)
        if (entry?.payload.uid === uid) return entry.payload
      }
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

// A back-channel POST the provider makes on its own (end_session confirm), keyed by the sid of its logout token (one
// per session and client), read back by LoginSession#logout(). The provider's verdict comes by its events.
interface EndSessionPost extends PostRecord { postedAt: number, error?: string, answeredAt?: number }

function sidOfLogoutToken (token: string | undefined): string {
  if (token === undefined) return ''
  try {
    const sid = decodeJwt(token).sid
    return typeof sid === 'string' ? sid : ''
  } catch {
    return ''
  }
}

function errorText (err: unknown): string {
  const cause = err instanceof Error && err.cause instanceof Error ? ` (${err.cause.message})` : ''
  return err instanceof Error ? `${err.message}${cause}` : String(err)
}

// oidc-provider prints this at every construction with devInteractions (login() needs them; the issuer is a test double)
const DEV_INTERACTIONS_WARNING = 'development-only feature devInteractions is enabled'

function withoutDevInteractionsWarning<T> (fn: () => T): T {
  const warn = console.warn
  console.warn = (...args: unknown[]) => {
    if (typeof args[0] === 'string' && args[0].includes(DEV_INTERACTIONS_WARNING)) return
    warn.apply(console, args)
  }
  try {
    return fn()
  } finally {
    console.warn = warn
  }
}

// Headless browser for login(): fetch without following redirects, and a cookie jar (name=value; path and domain
// ignored: one provider on one origin).
interface Hop { status: number, location: string | undefined, text: string }

function browser () {
  const jar = new Map<string, string>()
  return async (url: string, init: { method?: string, form?: Record<string, string> } = {}): Promise<Hop> => {
    const headers: Record<string, string> = {}
    if (jar.size > 0) headers.cookie = [...jar].map(([k, v]) => `${k}=${v}`).join('; ')
    if (init.form !== undefined) headers['content-type'] = 'application/x-www-form-urlencoded'
    const res = await fetch(url, {
      method: init.method ?? 'GET',
      headers,
      redirect: 'manual',
      signal: AbortSignal.timeout(10_000),
      ...(init.form !== undefined ? { body: new URLSearchParams(init.form) } : {})
    })
    for (const cookie of res.headers.getSetCookie()) {
      const pair = cookie.split(';')[0] ?? ''
      const eq = pair.indexOf('=')
      if (eq <= 0) continue
      const name = pair.slice(0, eq).trim()
      const value = pair.slice(eq + 1).trim()
      if (value === '' || /expires=Thu, 01 Jan 1970/i.test(cookie)) jar.delete(name)
      else jar.set(name, value)
    }
    const location = res.headers.get('location') ?? undefined
    return { status: res.status, location: location === undefined ? undefined : new URL(location, url).href, text: await res.text() }
  }
}

function redirected (hop: Hop, step: string): string {
  if (hop.status !== 303 && hop.status !== 302) {
    throw new Error(`login: ${step}: expected a redirect, got ${hop.status}: ${hop.text.slice(0, 300)}`)
  }
  if (hop.location === undefined) throw new Error(`login: ${step}: ${hop.status} without Location`)
  return hop.location
}

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
  const endSessionPosts = new Map<string, EndSessionPost[]>()
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
    const next = withoutDevInteractionsWarning(() => new Provider(issuer, {
      adapter: Adapter,
      jwks: { keys: keys.map((k) => k.privateJwk) },
      routes: ROUTES,
      clients: [],
      scopes: ['openid', 'offline_access', 'profile', 'email'],
      features: {
        devInteractions: { enabled: true }, // login()
        rpInitiatedLogout: {
          enabled: true,
          // the confirmation form as the provider builds it (id op.logoutForm, hidden xsrf), without the default's noise
          logoutSource: async (ctx: { body: unknown }, form: string) => {
            ctx.body = `<!DOCTYPE html><html><body>${form}<button type="submit" form="op.logoutForm" name="logout" value="yes">Sign out</button></body></html>`
          },
          postLogoutSuccessSource: async (ctx: { body: unknown }) => {
            ctx.body = '<!DOCTYPE html><html><body>Signed out</body></html>'
          }
        },
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
        ClientCredentials: (_ctx: unknown, token: ProviderToken) => token.resourceServer?.accessTokenTTL ?? DEFAULT_TTL_SECONDS,
        // login(): set, so that the provider does not print a notice for each default it would call
        AccessToken: (_ctx: unknown, token: ProviderToken) => token.resourceServer?.accessTokenTTL ?? DEFAULT_TTL_SECONDS,
        IdToken: () => DEFAULT_TTL_SECONDS,
        Interaction: () => 600,
        Session: () => 3600,
        Grant: () => 3600
      },
      // login(): any account id exists (the default does the same, with a warning)
      findAccount: async (_ctx: unknown, sub: string) => ({ accountId: sub, claims: async () => ({ sub }) }),
      // login(): no consent prompt; the grant covers the OIDC scopes and the API (the provider's documented way)
      loadExistingGrant: async (ctx: AuthorizationContext) => {
        const { oidc } = ctx
        const grantId = oidc.result?.consent?.grantId ?? oidc.session.grantIdFor(oidc.client.clientId)
        if (grantId !== undefined) return await oidc.provider.Grant.find(grantId)
        const grant = new oidc.provider.Grant({ clientId: oidc.client.clientId, accountId: oidc.session.accountId })
        grant.addOIDCScope(LOGIN_SCOPE)
        grant.addResourceScope(RESOURCE_INDICATOR, TOKEN_SCOPE)
        await grant.save()
        return grant
      },
      // The provider's outgoing requests (back-channel logout POSTs): without its SSRF guard, which refuses loopback
      // addresses, and recorded for backchannelLogout().
      fetch: async (url: string | URL, options: RequestInit & { dispatcher?: unknown }) => {
        delete options.dispatcher
        let record: PostRecord | undefined = posts.getStore()
        if (record !== undefined) {
          record.postedAt = Date.now()
          record.logoutToken = logoutTokenOf(options.body)
          record.onPost?.(record.postedAt)
        } else {
          // one the provider makes on its own: end_session (login().logout())
          const logoutToken = logoutTokenOf(options.body)
          const post: EndSessionPost = { postedAt: Date.now(), ...(logoutToken !== undefined ? { logoutToken } : {}) }
          const sid = sidOfLogoutToken(logoutToken)
          endSessionPosts.set(sid, [...(endSessionPosts.get(sid) ?? []), post])
          record = post
        }
        const res = await globalThis.fetch(url, options)
        record.status = res.status
        return res
      },
      extraTokenClaims: async (ctx: ProviderContext, token: ProviderToken) => {
        // client_credentials: the form field; the authorization code flow (login()): the session's sid
        const sid = bodyParam(ctx, PARAM.sid) ?? token.sid
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
    }))
    next.on('server_error', (_ctx: unknown, err: unknown) => { lastServerError = err })
    // the verdict on an end_session back-channel POST (the request itself was recorded by the fetch override)
    const verdict = (sid: unknown, error: string | undefined): void => {
      const post = endSessionPosts.get(typeof sid === 'string' ? sid : '')?.find((p) => p.answeredAt === undefined)
      if (post === undefined) return
      post.answeredAt = Date.now()
      if (error !== undefined) post.error = error
    }
    next.on('backchannel.success', (_ctx: unknown, _client: unknown, _accountId: unknown, sid: unknown) => { verdict(sid, undefined) })
    next.on('backchannel.error', (_ctx: unknown, err: unknown, _client: unknown, _accountId: unknown, sid: unknown) => { verdict(sid, errorText(err)) })
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

    async login (sub: string = DEFAULT_SUB): Promise<LoginSession> {
      if (!SUB_PATTERN.test(sub)) throw new TypeError(`login: sub must match ${SUB_PATTERN}, got ${JSON.stringify(sub)}`)
      if (backchannelLogoutUri === undefined) throw new Error('login: no back-channel logout URI set (setBackchannelLogoutUri), so no sid')
      const go = browser()
      const verifier = randomBytes(32).toString('base64url')
      const nonce = randomBytes(12).toString('base64url')
      const state = randomBytes(12).toString('base64url')
      const authorize = new URL(`${issuer}${ROUTES.authorization}`)
      authorize.search = new URLSearchParams({
        client_id: LOGOUT_CLIENT_ID,
        response_type: 'code',
        scope: LOGIN_SCOPE,
        redirect_uri: LOGIN_REDIRECT_URI,
        code_challenge: createHash('sha256').update(verifier).digest('base64url'),
        code_challenge_method: 'S256',
        state,
        nonce
      }).toString()

      const interaction = redirected(await go(authorize.href), 'authorization request')
      let next = redirected(await go(interaction, { method: 'POST', form: { prompt: 'login', login: sub, password: 'any' } }), 'login form')
      let code: string | undefined
      for (let hop = 0; hop < 5 && code === undefined; hop++) {
        if (next.startsWith(`${LOGIN_REDIRECT_URI}?`)) {
          const back = new URL(next).searchParams
          if (back.get('state') !== state) throw new Error(`login: state mismatch in ${next}`)
          const c = back.get('code')
          if (c === null) throw new Error(`login: no code: ${next}`)
          code = c
        } else {
          next = redirected(await go(next), 'resume')
        }
      }
      if (code === undefined) throw new Error(`login: no code after 5 redirects (last ${next})`)

      const basic = Buffer.from(`${LOGOUT_CLIENT_ID}:${encodeURIComponent(TEST_CLIENT_SECRET)}`).toString('base64')
      const res = await fetch(tokenUrl, {
        method: 'POST',
        headers: { authorization: `Basic ${basic}`, 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: LOGIN_REDIRECT_URI, code_verifier: verifier, resource: RESOURCE_INDICATOR })
      })
      const body = await res.json() as { access_token?: unknown, id_token?: unknown, error?: string, error_description?: string }
      if (!res.ok || typeof body.access_token !== 'string' || typeof body.id_token !== 'string') {
        const cause = res.status >= 500 ? lastServerError : undefined
        throw new Error(`login: token endpoint answered ${res.status}: ${body.error ?? ''} ${body.error_description ?? ''}`.trim(), { cause })
      }
      const accessToken = body.access_token
      const idToken = body.id_token
      const sid = decodeJwt(accessToken).sid
      if (typeof sid !== 'string' || sid === '') throw new Error('login: the access token has no sid')
      if (decodeJwt(idToken).nonce !== nonce) throw new Error('login: the ID token does not carry the nonce')

      let loggedOut: Promise<EndSessionResult> | undefined
      const logout = async (opts: { onConfirm?: (at: number) => void } = {}): Promise<EndSessionResult> => {
        const page = await go(`${issuer}${ROUTES.end_session}?${new URLSearchParams({ id_token_hint: idToken }).toString()}`)
        if (page.status !== 200) throw new Error(`logout: end_session answered ${page.status}: ${page.text.slice(0, 300)}`)
        const action = /<form id="op\.logoutForm"[^>]*action="([^"]+)"/.exec(page.text)?.[1]
        const xsrf = /name="xsrf" value="([^"]+)"/.exec(page.text)?.[1]
        if (action === undefined || xsrf === undefined) throw new Error(`logout: no confirmation form in ${page.text.slice(0, 300)}`)
        const confirmSentAt = Date.now()
        opts.onConfirm?.(confirmSentAt)
        const answer = await go(new URL(action, issuer).href, { method: 'POST', form: { xsrf, logout: 'yes' } })
        const answeredAt = Date.now()
        if (answer.status !== 303 || answer.location === undefined) {
          throw new Error(`logout: the confirmation answered ${answer.status}: ${answer.text.slice(0, 300)}`)
        }
        const made = (endSessionPosts.get(sid) ?? []).filter((p) => p.postedAt >= confirmSentAt)
        endSessionPosts.delete(sid)
        return {
          confirmSentAt,
          answeredAt,
          location: answer.location,
          backchannel: made.map((p) => ({
            ok: p.error === undefined && (p.status === 200 || p.status === 204),
            status: p.status,
            error: p.error,
            logoutToken: p.logoutToken,
            postedAt: p.postedAt,
            answeredAt: p.answeredAt ?? answeredAt
          }))
        }
      }
      return {
        sub,
        accessToken,
        idToken,
        sid,
        logout: (opts) => (loggedOut ??= logout(opts))
      }
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
