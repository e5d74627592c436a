/**
 * The admin listener: a separate Fastify instance on ADMIN_PORT, so /metrics,
 * /healthz and /readyz are never reachable through the public port.
 */
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify'
import type { Metrics } from '../observability/metrics.js'
import type { Readiness } from './readiness.js'

export function buildAdmin (logger: FastifyBaseLogger, metrics: Metrics, readiness: Readiness): FastifyInstance {
  const admin = Fastify({ loggerInstance: logger.child({ component: 'admin' }), logController: new LogController({ disableRequestLogging: true }) })

  admin.get('/healthz', async () => ({ status: 'ok' }))

  admin.get('/readyz', async (_request, reply) => {
    const { ready, checks } = await readiness.evaluate()
    return reply.code(ready ? 200 : 503).send({ status: ready ? 'ready' : 'not_ready', checks })
  })

  admin.get('/metrics', async (_request, reply) => {
    const body = await metrics.registry.metrics()
    return reply.type(metrics.registry.contentType).send(body)
  })

  return admin
}
