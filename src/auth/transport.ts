/**
 * Bearer tokens must not travel in clear text. A request is secure when the
 * gateway terminated TLS itself, or when a trusted proxy (TRUST_PROXY) says the
 * client used https (Fastify derives request.protocol from X-Forwarded-Proto
 * only for trusted hops). ALLOW_INSECURE_HTTP=true lifts the rule (development).
 */
import type { IncomingMessage } from 'node:http'
import type { FastifyRequest } from 'fastify'
import type { TrustProxy } from '../config/parsers.js'

export function transportAllowsToken (request: FastifyRequest, allowInsecureHttp: boolean): boolean {
  return allowInsecureHttp || request.protocol === 'https'
}

/**
 * A WebSocket handshake: Node saw `Connection: Upgrade` with `Upgrade:` (only
 * then does the request reach the upgrade listener, with `req.upgrade` set).
 * An `Upgrade: websocket` header on an ordinary keep-alive request is a plain
 * HTTP request and is proxied (and judged) as one.
 */
export function isWebSocketHandshake (req: IncomingMessage): boolean {
  if ((req as IncomingMessage & { upgrade?: boolean }).upgrade !== true) return false
  const u = req.headers.upgrade
  return u !== undefined && u.toLowerCase() === 'websocket'
}

/** What Fastify's `trustProxy` option takes: trust all, a list of IPs/CIDRs, or a function of (address, hop). */
export type ProxyTrust = boolean | string[] | ((address: string, hop: number) => boolean)

/**
 * TRUST_PROXY as Fastify must be given it. A hop count N trusts the peer and
 * the N-1 addresses before it in X-Forwarded-For, so the client is the N-th
 * address from the right (Envoy's xff_num_trusted_hops, Express's
 * `trust proxy = N`). Fastify 5.12 turns a bare number into "trust nothing",
 * so the count is passed as a function of the hop index (0 = the peer).
 */
export function proxyTrust (tp: TrustProxy): ProxyTrust {
  if (typeof tp !== 'number') return tp
  const hops = tp
  return (_address, hop) => hop < hops
}
