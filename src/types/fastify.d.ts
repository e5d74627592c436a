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
    /**
     * The key (PEM) resolved for this request's token: non-null tells a bad
     * signature from a malformed token, and the verified-token cache keeps it.
     */
    keyPem: string | null
  }
}
