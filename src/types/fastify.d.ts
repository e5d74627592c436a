import type { Identity } from '../auth/identity.js'
import type { Transport } from '../observability/metrics.js'

declare module 'fastify' {
  interface FastifyRequest {
    /** The verified caller; null on public paths and before auth ran. */
    identity: Identity | null
    /** 'ws' for WebSocket upgrade requests. */
    transport: Transport
  }
}
