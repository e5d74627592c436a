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
    trustProxy: config.server.trustProxy !== false,
    forwardAuthorization: config.upstream.forwardAuthorization
  }
}
