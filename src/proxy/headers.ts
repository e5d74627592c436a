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

export function upstreamHeaders (headers: IncomingHttpHeaders, ctx: ForwardContext): IncomingHttpHeaders {
  const out: IncomingHttpHeaders = {}
  for (const name in headers) {
    if (name.startsWith(IDENTITY_PREFIX)) continue
    if (name === 'forwarded') continue
    if (!ctx.trustProxy && name.startsWith('x-forwarded-')) continue
    out[name] = headers[name]
  }
  if (!ctx.forwardAuthorization) delete out.authorization

  const id = ctx.identity
  if (id !== null) {
    const h = identityHeaders(id)
    out['x-user-sub'] = h.sub
    if (h.roles !== undefined) out['x-user-roles'] = h.roles
    if (h.name !== undefined) out['x-user-name'] = h.name
  }

  const prior = ctx.trustProxy ? headers['x-forwarded-for'] : undefined
  const peer = ctx.remoteAddress ?? ctx.clientIp
  out['x-forwarded-for'] = prior !== undefined && prior !== '' ? `${String(prior)}, ${peer}` : peer
  out['x-forwarded-proto'] = ctx.protocol
  out['x-forwarded-host'] = ctx.host
  out['x-request-id'] = ctx.requestId
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
