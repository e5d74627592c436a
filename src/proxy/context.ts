import type { FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { ForwardContext } from './headers.js'

export function forwardContext (request: FastifyRequest, config: Config): ForwardContext {
  return {
    identity: request.identity,
    requestId: request.id,
    clientIp: request.ip,
    remoteAddress: request.socket.remoteAddress,
    protocol: request.protocol,
    host: request.host,
    // Only a trusted peer's forwarding headers are kept: Fastify lists more
    // than the peer in request.ips exactly when the peer is trusted and forwarded.
    trustProxy: config.server.trustProxy !== false && (request.ips?.length ?? 1) > 1,
    forwardAuthorization: config.upstream.forwardAuthorization
  }
}
