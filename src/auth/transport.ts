/**
 * Bearer tokens must not travel in clear text. A request is secure when the
 * gateway terminated TLS itself, or when a trusted proxy (TRUST_PROXY) says the
 * client used https (Fastify derives request.protocol from X-Forwarded-Proto
 * only for trusted hops). ALLOW_INSECURE_HTTP=true lifts the rule (development).
 */
import type { IncomingMessage } from 'node:http'
import proxyAddr from '@fastify/proxy-addr'
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

/** Whether the address at `hop` (0 = the TCP peer, then X-Forwarded-For from the right) is a trusted proxy. */
export type ProxyTrust = (address: string, hop: number) => boolean

/**
 * TRUST_PROXY as Fastify's `trustProxy` option, compiled once: Fastify uses a
 * function as it is (its lib/request.js getTrustProxyFn), so the limits that
 * ask `trustedPeer` and Fastify's request.ip/protocol/host answer alike.
 * - false: false, so Fastify keeps its plain request (no X-Forwarded-* read);
 * - true: every hop, as Fastify's own `() => true`;
 * - a list of IPs/CIDRs: compiled by @fastify/proxy-addr, as Fastify does;
 * - a hop count N trusts the peer and the N-1 addresses before it in
 *   X-Forwarded-For, so the client is the N-th address from the right
 *   (Envoy's xff_num_trusted_hops, Express's `trust proxy = N`). Fastify 5.12
 *   turns a bare number into "trust nothing", hence a function of the hop.
 */
export function proxyTrust (tp: TrustProxy): ProxyTrust | false {
  if (tp === false) return false
  if (tp === true) return () => true
  if (typeof tp === 'number') return (_address, hop) => hop < tp
  return proxyAddr.compile(tp)
}

/**
 * Whether a TCP peer is a trusted proxy: hop 0 of `trust`, the test Fastify
 * applies to `socket.remoteAddress` before reading X-Forwarded-Proto/-Host.
 */
export function trustedPeer (trust: ProxyTrust | false, address: string): boolean {
  return trust !== false && trust(address, 0)
}
