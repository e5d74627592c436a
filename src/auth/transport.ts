/**
 * Bearer tokens must not travel in clear text. A request is secure when the
 * gateway terminated TLS itself, or when a trusted proxy (TRUST_PROXY) says the
 * client used https (Fastify derives request.protocol from X-Forwarded-Proto
 * only for trusted hops). ALLOW_INSECURE_HTTP=true lifts the rule (development).
 */
import type { IncomingMessage } from 'node:http'
import type { FastifyRequest } from 'fastify'

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
