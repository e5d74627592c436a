/**
 * What the app receives: client-supplied identity headers stripped, then the
 * verified identity injected (oauth2-proxy's strip -> inject), the usual
 * X-Forwarded-* set, and credentials removed unless configured otherwise.
 * Pure and unit-tested; shared by the HTTP and WebSocket paths.
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

/** Header values must be visible ASCII; anything else is percent-encoded. */
function headerSafe (v: string): string {
  return /^[\x20-\x7e]*$/.test(v) ? v : encodeURIComponent(v)
}

interface IdentityHeaders { sub: string, roles: string | undefined, name: string | undefined }
/** Header values per identity, built once: a cached token's identity object is reused request after request. */
const identityHeaderCache = new WeakMap<Identity, IdentityHeaders>()

function identityHeaders (id: Identity): IdentityHeaders {
  let h = identityHeaderCache.get(id)
  if (h === undefined) {
    h = {
      sub: headerSafe(id.sub),
      roles: id.roles.length > 0 ? headerSafe(id.roles.join(',')) : undefined,
      name: id.username !== undefined ? headerSafe(id.username) : undefined
    }
    identityHeaderCache.set(id, h)
  }
  return h
}

/**
 * Rewrites a request's header object IN PLACE for the app and returns it.
 * Removed headers are set to undefined (undici skips those) instead of being
 * deleted, which would turn the object into a slow dictionary. For the HTTP
 * path, where @fastify/reply-from hands over its own copy of the headers.
 */
export function rewriteUpstreamHeaders (headers: IncomingHttpHeaders, ctx: ForwardContext): IncomingHttpHeaders {
  const prior = ctx.trustProxy ? headers['x-forwarded-for'] : undefined
  const names = Object.keys(headers)
  for (let i = 0; i < names.length; i++) {
    const name = names[i] as string
    const drop = name.charCodeAt(0) === 120 // 'x'
      ? name.startsWith(IDENTITY_PREFIX) || (!ctx.trustProxy && name.startsWith('x-forwarded-'))
      : name === 'forwarded'
    if (drop) headers[name] = undefined
  }
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
  headers['x-request-id'] = ctx.requestId
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
    if (v === undefined) continue // an undefined value would throw after the 101 (STACK-NOTES §2)
    out[name] = Array.isArray(v) ? v.join(', ') : v
  }
  return out
}
