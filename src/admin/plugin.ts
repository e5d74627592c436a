/**
 * The admin listener: a separate Fastify instance on ADMIN_PORT, so /metrics,
 * /healthz, /readyz and the revocation API are never reachable through the
 * public port. The port is private but not trusted blindly: changing state
 * (POST /revocations) needs the ADMIN_TOKEN bearer secret.
 */
import { timingSafeEqual, createHash } from 'node:crypto'
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import type { Metrics } from '../observability/metrics.js'
import type { Audit } from '../observability/audit.js'
import { REVOCATION_KINDS, type RevocationKind, type Revocations } from '../auth/revocation.js'
import type { Readiness } from './readiness.js'
import { ADMIN_DISABLED, ADMIN_UNAUTHORIZED, badRevocationAnswer, REVOCATIONS_UNAVAILABLE, send } from '../http/answers.js'

export interface AdminOptions {
  logger: FastifyBaseLogger
  metrics: Metrics
  /** Revocations and refused admin tokens are audit lines. */
  audit: Audit
  readiness: Readiness
  revocations: Revocations
  adminToken: string | undefined
}

const digest = (s: string): Buffer => createHash('sha256').update(s).digest()

export function buildAdmin (opts: AdminOptions): FastifyInstance {
  const { metrics, audit, readiness, revocations, adminToken } = opts
  const admin = Fastify({
    loggerInstance: opts.logger.child({ component: 'admin' }),
    logController: new LogController({ disableRequestLogging: true }),
    bodyLimit: 16 * 1024,
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false } }
  })

  admin.get('/healthz', async () => ({ status: 'ok' }))

  admin.get('/readyz', async (_request, reply) => {
    const { ready, checks } = await readiness.evaluate()
    return reply.code(ready ? 200 : 503).send({ status: ready ? 'ready' : 'not_ready', checks })
  })

  admin.get('/metrics', async (_request, reply) => {
    const body = await metrics.registry.metrics()
    return reply.type(metrics.registry.contentType).send(body)
  })

  const expected = adminToken !== undefined ? digest(adminToken) : undefined
  function authorized (request: FastifyRequest, reply: FastifyReply): boolean {
    const m = /^Bearer (\S+)$/i.exec(request.headers.authorization ?? '')
    // Compare digests: constant time whatever the presented length.
    if (expected !== undefined && m !== null && timingSafeEqual(digest(m[1] as string), expected)) return true
    audit.admin(request, 'admin_denied', { path: request.routeOptions.url }, 'admin API: bad or missing token')
    send(reply, ADMIN_UNAUTHORIZED)
    return false
  }

  admin.post('/revocations', {
    // Authenticate before the body is even validated: strangers learn nothing about the API.
    onRequest: (request, reply, done) => {
      if (expected === undefined) {
        send(reply, ADMIN_DISABLED)
        return
      }
      if (authorized(request, reply)) done()
    },
    schema: {
      body: {
        type: 'object',
        additionalProperties: false,
        minProperties: 1,
        maxProperties: 1,
        properties: {
          jti: { type: 'string', minLength: 1, maxLength: 512 },
          sub: { type: 'string', minLength: 1, maxLength: 512 },
          sid: { type: 'string', minLength: 1, maxLength: 512 }
        }
      }
    }
  }, async (request, reply) => {
    const body = request.body as Partial<Record<RevocationKind, unknown>>
    const kind = REVOCATION_KINDS.find((k) => body[k] !== undefined)
    const value = kind !== undefined ? body[kind] : undefined
    if (kind === undefined || typeof value !== 'string') return send(reply, badRevocationAnswer())
    const r = await revocations.revoke(kind, value)
    audit.admin(request, 'revoked', { kind, sub: kind === 'sub' ? value : undefined, sid: kind === 'sid' ? value : undefined }, 'token revocation')
    return reply.code(201).send({ kind: r.kind, value: r.value, issuedBefore: r.at, expiresAt: new Date(r.expiresAt).toISOString() })
  })

  admin.setErrorHandler((err: Error & { statusCode?: number, validation?: unknown }, request, reply) => {
    if (err.validation !== undefined || (err.statusCode !== undefined && err.statusCode < 500)) {
      return send(reply, badRevocationAnswer(err.statusCode))
    }
    request.log.error({ err: { message: err.message } }, 'admin request failed')
    return send(reply, REVOCATIONS_UNAVAILABLE)
  })

  return admin
}
