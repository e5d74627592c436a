/**
 * One audit line and one counter increment per denial, always together.
 * Fields are fixed: event, reason, sub, ip, method, path (no query), transport,
 * status, plus pino's reqId from the request logger. Never a token or header.
 */
import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import type { AuthFailureReason, Metrics, Transport } from './metrics.js'
import { pathOf } from './logger.js'

export type AuditEvent = 'auth_failure' | 'forbidden' | 'rate_limited'

export interface Denial {
  event: AuditEvent
  reason: string
  transport: Transport
  status: number
  sub?: string | undefined
}

export interface Audit {
  denied (request: FastifyRequest, denial: Denial): void
  /** For denials outside a request (e.g. a WebSocket message over its limit). */
  deniedRaw (log: FastifyBaseLogger, fields: Denial & { ip: string, method: string, path: string }): void
}

export function createAudit (metrics: Metrics): Audit {
  function count (d: Denial): void {
    if (d.event === 'auth_failure') metrics.authFailures.labels(d.reason as AuthFailureReason, d.transport).inc()
    else if (d.event === 'forbidden') metrics.forbidden.labels(d.transport).inc()
    else metrics.rateLimited.labels(d.transport).inc()
  }
  function write (log: FastifyBaseLogger, d: Denial & { ip: string, method: string, path: string }): void {
    log.warn({
      component: 'audit',
      event: d.event,
      reason: d.reason,
      sub: d.sub,
      ip: d.ip,
      method: d.method,
      path: d.path,
      transport: d.transport,
      status: d.status
    }, 'denied')
  }
  return {
    denied (request, d) {
      count(d)
      write(request.log, { ...d, ip: request.ip, method: request.method, path: pathOf(request.url) })
    },
    deniedRaw (log, fields) {
      count(fields)
      write(log, fields)
    }
  }
}
