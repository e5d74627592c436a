/**
 * What the app receives: client-supplied identity headers stripped, then the
 * verified identity injected (oauth2-proxy's strip -> inject), the usual
 * X-Forwarded-* and X-Real-IP set, hop-by-hop headers dropped, and
 * credentials removed unless configured otherwise. What the client receives
 * from the app: the app's hop-by-hop headers dropped.
 * Pure and unit-tested; shared by the HTTP and WebSocket paths.
 *
 * Names are compared after mapping `_` to `-`: CGI, PHP, WSGI and Rack expose
 * `X-User_Sub` and `X-User-Sub` alike as HTTP_X_USER_SUB, so an underscore
 * spelling of a header the gateway manages is dropped too.
 */
import type { IncomingHttpHeaders } from 'node:http'
import type { Identity } from '../auth/identity.js'

export const IDENTITY_PREFIX = 'x-user-'

export interface ForwardContext {
  identity: Identity | null
  requestId: string
  /** Client address as Fastify derived it (honours TRUST_PROXY). */
  clientIp: string
  /** The peer that connected to us. */
  remoteAddress: string | undefined
  protocol: 'http' | 'https'
  host: string
  trustProxy: boolean
  forwardAuthorization: boolean
}

/** `%XX` (uppercase hex) for every byte value. */
const PERCENT: readonly string[] = Array.from({ length: 256 }, (_, b) => `%${b.toString(16).toUpperCase().padStart(2, '0')}`)

/** Bytes 0x21-0x7E pass unchanged, except `%` (the escape) and `,` (the X-User-Roles separator). */
function passes (c: number): boolean {
  return c >= 0x21 && c <= 0x7e && c !== 0x25 && c !== 0x2c
}

/**
 * The encoding of one identity value (X-User-Sub, X-User-Name, each role of
 * X-User-Roles): bytes 0x21-0x7E unchanged except `%` and `,`; those, space and
 * every other byte of the value's UTF-8 (non-ASCII, controls) become %XX. So
 * decodeURIComponent gives back exactly the claim, `,` only ever separates
 * roles, and `josé` (jos%C3%A9) differs from a literal `jos%C3%A9`
 * (jos%25C3%25A9). A lone UTF-16 surrogate (possible in JSON) becomes U+FFFD
 * (%EF%BF%BD), as in any UTF-8 encoding.
 */
export function encodeIdentityValue (v: string): string {
  for (let i = 0; i < v.length; i++) {
    if (!passes(v.charCodeAt(i))) return percentEncode(v)
  }
  return v
}

function percentEncode (v: string): string {
  const bytes = Buffer.from(v, 'utf8')
  let out = ''
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i] as number
    out += passes(b) ? String.fromCharCode(b) : PERCENT[b] as string
  }
  return out
}

interface IdentityHeaders { sub: string, roles: string | undefined, name: string | undefined }
/** Header values per identity, built once: a cached token's identity object is reused request after request. */
const identityHeaderCache = new WeakMap<Identity, IdentityHeaders>()

function identityHeaders (id: Identity): IdentityHeaders {
  let h = identityHeaderCache.get(id)
  if (h === undefined) {
    h = {
      sub: encodeIdentityValue(id.sub),
      roles: id.roles.length > 0 ? id.roles.map(encodeIdentityValue).join(',') : undefined,
      name: id.username !== undefined ? encodeIdentityValue(id.username) : undefined
    }
    identityHeaderCache.set(id, h)
  }
  return h
}

/**
 * Whether a client request header (lowercase name, as Node parses it) must not
 * reach the app. One char switch per name; a string is built only for a name
 * that starts with `x` and contains `_`.
 *  - hop-by-hop (RFC 9110 7.6.1): Connection, Keep-Alive, Proxy-Connection, TE,
 *    Trailer, Transfer-Encoding (undici and Node frame the body themselves),
 *    Upgrade, Proxy-Authorization, Proxy-Authenticate; and Expect: the gateway
 *    answers 100-continue itself (undici refuses an `expect` header);
 *  - the client's Forwarded, X-User-*, and X-Forwarded-* unless the peer is a
 *    trusted proxy; any underscore spelling of X-User-*, X-Forwarded-*,
 *    X-Real-IP and X-Request-Id (trusted or not: no proxy vouches for those);
 *    X-Real-IP and X-Request-Id themselves are overwritten by the caller;
 *  - Proxy, which CGI exposes as HTTP_PROXY, an outgoing proxy setting for
 *    many HTTP clients ("httpoxy").
 */
function dropRequestHeader (name: string, trustProxy: boolean): boolean {
  switch (name.charCodeAt(0)) {
    case 120: // x
      if (name.includes('_')) return managedName(name.replaceAll('_', '-'))
      return name.startsWith(IDENTITY_PREFIX) || (!trustProxy && name.startsWith('x-forwarded-'))
    case 99: return name === 'connection' // c
    case 101: return name === 'expect' // e
    case 102: return name === 'forwarded' // f
    case 107: return name === 'keep-alive' // k
    case 112: return name === 'proxy-connection' || name === 'proxy-authorization' || name === 'proxy-authenticate' || name === 'proxy' // p
    case 116: return name === 'te' || name === 'trailer' || name === 'transfer-encoding' // t
    case 117: return name === 'upgrade' // u
    default: return false
  }
}

/** Names (already `_` -> `-`) of headers the gateway sets for the app. */
function managedName (name: string): boolean {
  return name.startsWith(IDENTITY_PREFIX) || name.startsWith('x-forwarded-') || name === 'x-real-ip' || name === 'x-request-id'
}

/** The header names a Connection header value lists (lowercase), `close`, `keep-alive` and `upgrade` included. */
function connectionTokens (value: string | string[]): string[] {
  const list = Array.isArray(value) ? value.join(',') : value
  const out: string[] = []
  for (const token of list.split(',')) {
    const name = token.trim().toLowerCase()
    if (name !== '') out.push(name)
  }
  return out
}

/**
 * Rewrites a request's header object IN PLACE for the app and returns it.
 * Removed headers are set to undefined (undici skips those) instead of being
 * deleted, which would turn the object into a slow dictionary. For the HTTP
 * path, where @fastify/reply-from hands over its own copy of the headers.
 * (reply-from has already deleted the client's Connection header and the
 * names it lists; the WebSocket path still has them.)
 */
export function rewriteUpstreamHeaders (headers: IncomingHttpHeaders, ctx: ForwardContext): IncomingHttpHeaders {
  const prior = ctx.trustProxy ? headers['x-forwarded-for'] : undefined
  const connection = headers.connection
  const names = Object.keys(headers)
  for (let i = 0; i < names.length; i++) {
    const name = names[i] as string
    if (dropRequestHeader(name, ctx.trustProxy)) headers[name] = undefined
  }
  // Before anything is set below: the client cannot list away a header the gateway sets.
  if (connection !== undefined) for (const name of connectionTokens(connection)) headers[name] = undefined
  if (!ctx.forwardAuthorization) headers.authorization = undefined

  const id = ctx.identity
  if (id !== null) {
    const h = identityHeaders(id)
    headers['x-user-sub'] = h.sub
    if (h.roles !== undefined) headers['x-user-roles'] = h.roles
    if (h.name !== undefined) headers['x-user-name'] = h.name
  }

  const peer = ctx.remoteAddress ?? ctx.clientIp
  headers['x-forwarded-for'] = prior !== undefined && prior !== '' ? `${String(prior)}, ${peer}` : peer
  headers['x-forwarded-proto'] = ctx.protocol
  headers['x-forwarded-host'] = ctx.host
  headers['x-real-ip'] = ctx.clientIp
  headers['x-request-id'] = ctx.requestId
  return headers
}

/** Response headers as undici hands them to @fastify/reply-from (lowercase names). */
export type ResponseHeaders = Record<string, string | string[] | undefined>

/**
 * Drops the app's hop-by-hop response headers IN PLACE and returns the object:
 * Connection and every name it lists, Keep-Alive, Proxy-Connection, TE,
 * Trailer, Upgrade, Proxy-Authenticate. They describe the gateway's connection
 * to the app, not the client's: passed on, the app's `Connection: keep-alive`
 * would override a client's `Connection: close` (Node keeps the socket open
 * when the response says keep-alive) and the app's `Connection: close` would
 * close a client's kept-alive connection. (reply-from already drops
 * Transfer-Encoding; Node frames the body towards the client.) Deleted rather
 * than set to undefined: Fastify's reply.header() turns undefined into ''.
 */
export function rewriteDownstreamHeaders (headers: ResponseHeaders): ResponseHeaders {
  const connection = headers.connection
  if (connection !== undefined) {
    delete headers.connection
    for (const name of connectionTokens(connection)) delete headers[name]
  }
  if (headers['keep-alive'] !== undefined) delete headers['keep-alive']
  if (headers['proxy-connection'] !== undefined) delete headers['proxy-connection']
  if (headers.te !== undefined) delete headers.te
  if (headers.trailer !== undefined) delete headers.trailer
  if (headers.upgrade !== undefined) delete headers.upgrade
  if (headers['proxy-authenticate'] !== undefined) delete headers['proxy-authenticate']
  return headers
}

/** What the app receives, as a new object (the input is not touched); no undefined values. */
export function upstreamHeaders (headers: IncomingHttpHeaders, ctx: ForwardContext): IncomingHttpHeaders {
  const out = rewriteUpstreamHeaders({ ...headers }, ctx)
  for (const name of Object.keys(out)) if (out[name] === undefined) delete out[name]
  return out
}

/** Handshake and hop-by-hop headers the WebSocket client library sets itself. */
const WS_OWN_HEADERS = new Set([
  'host', 'connection', 'upgrade', 'content-length', 'transfer-encoding', 'keep-alive', 'te', 'trailer',
  'proxy-connection', 'proxy-authorization', 'sec-websocket-key', 'sec-websocket-version',
  'sec-websocket-extensions', 'sec-websocket-protocol', 'sec-websocket-accept'
])

/** Headers for the upstream WebSocket handshake: no token, no handshake fields. */
export function upstreamWsHeaders (headers: IncomingHttpHeaders, ctx: ForwardContext): Record<string, string> {
  const out: Record<string, string> = {}
  const all = upstreamHeaders(headers, ctx)
  for (const name in all) {
    if (WS_OWN_HEADERS.has(name)) continue
    const v = all[name]
    if (v === undefined) continue // ws throws ERR_HTTP_INVALID_HEADER_VALUE on an undefined value
    out[name] = Array.isArray(v) ? v.join(', ') : v
  }
  return out
}
