import type { Identity } from '../auth/identity.js'
import type { Transport } from '../observability/metrics.js'

declare module 'fastify' {
  interface FastifyRequest {
    /** The verified caller; null on public paths and before auth ran. */
    identity: Identity | null
    /** 'ws' for WebSocket upgrade requests. */
    transport: Transport
    /** The bearer token of this request, for @fastify/jwt's extractToken only. */
    bearerToken: string | null
    /** Whether the signing key was resolved (tells malformed from bad signature). */
    keyResolved: boolean
    /** The key (PEM) that verified this request's token, for the verified-token cache. */
    keyPem: string | null
  }
}
