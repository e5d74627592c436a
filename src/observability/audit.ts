/**
 * The audit trail: one JSON line and one counter increment per denial, always
 * together, on its own destination (AUDIT_LOG: stdout, stderr or a file).
 * It is data, not diagnostics: its logger has a fixed level, so LOG_LEVEL
 * never filters it, and every line is written synchronously (fs.writeSync), so
 * a line is in the file or pipe before the denial is answered and a SIGTERM
 * never loses one.
 *
 * Line schema (README, Operations > Logs): level (40), time, pid, hostname,
 * log ("audit"), component ("audit"), event, reason, sub, ip, method, path
 * (no query), transport, status, action (WebSocket message limit only), reqId,
 * msg. The admin API writes event "revoked" and "admin_denied" lines here too,
 * and the back-channel logout endpoint one "logout" line per request (result,
 * sub, sid).
 * Never a token or a header.
 */
import { hostname } from 'node:os'
import type { FastifyRequest } from 'fastify'
import pino, { type DestinationStream, type Logger } from 'pino'
import type { AuthFailureReason, LogoutResult, Metrics, Transport } from './metrics.js'
import { ownCopy, pathOf, REDACT_PATHS } from './logger.js'

export type AuditEvent = 'auth_failure' | 'forbidden' | 'rate_limited'

/** The `reason` of forbidden lines. */
export const FORBIDDEN_REASONS = ['missing_role'] as const
/** The `reason` of rate_limited lines. */
export const RATE_LIMITED_REASONS = ['user_limit', 'route_limit', 'ip_limit', 'auth_failures', 'ws_connections', 'ws_message_limit'] as const

/** Every `reason` an audit line can carry (the README lists each; test/audit.test.ts checks it does). */
export type DenialReason = AuthFailureReason | typeof FORBIDDEN_REASONS[number] | typeof RATE_LIMITED_REASONS[number]

/** AUDIT_LOG values that are not file paths. */
export const AUDIT_STREAMS = ['stdout', 'stderr'] as const

export interface Denial {
  event: AuditEvent
  reason: DenialReason
  transport: Transport
  /** HTTP status of the refusal, or the WebSocket close code when a connection was closed. */
  status: number
  sub?: string | undefined
  /** WebSocket message limit only: the connection was closed, or the message dropped and the connection kept. */
  action?: 'close' | 'drop' | undefined
}

export type AdminEvent = 'revoked' | 'admin_denied'

export interface LogoutOutcome {
  result: LogoutResult
  /** The logout token's claims when it was read far enough (never the token itself). */
  sub?: string | undefined
  sid?: string | undefined
}

/**
 * What a denial's audit line takes from a request. A long-lived WebSocket
 * session keeps just these (requesterOf), not the whole request.
 */
export interface Requester {
  readonly ip: string
  readonly method: string
  readonly url: string
  readonly id: string
}

/** The Requester of a request: a few fields copied, the path without its query (no token kept). */
export function requesterOf (request: FastifyRequest): Requester {
  return { ip: request.ip, method: request.method, url: ownCopy(pathOf(request.url)), id: request.id }
}

export interface Audit {
  denied (request: Requester, denial: Denial): void
  /** An admin API event (no metric): a revocation, or a refused admin token. */
  admin (request: FastifyRequest, event: AdminEvent, fields: Record<string, unknown>, msg: string): void
  /** A back-channel logout request and what became of it (and resonance_backchannel_logouts_total). */
  logout (request: FastifyRequest, outcome: LogoutOutcome): void
  /** Writes anything still buffered (nothing is, with the synchronous destinations; kept for any other stream). */
  flush (): void
  /** Reopens a file destination (after log rotation moved it); no-op for stdout, stderr and streams. */
  reopen (): void
}

/**
 * The destination AUDIT_LOG names, opened now and written synchronously: a
 * file is appended to and created when missing (its directory must exist).
 */
export function auditDestination (setting: string): DestinationStream {
  const dest = setting === 'stdout' ? 1 : setting === 'stderr' ? 2 : setting
  const stream = pino.destination({ dest, sync: true, append: true, mkdir: false })
  // A failed write (disk full, closed pipe) must not take a request down with it.
  let reported = false
  stream.on('error', (err: Error) => {
    if (!reported) reportFailure('audit log write failed', err)
    reported = true
  })
  return stream
}

export function createAudit (metrics: Metrics, destination: DestinationStream): Audit {
  const log: Logger = pino({
    level: 'info', // fixed: LOG_LEVEL and its reloads govern the diagnostic logger only
    base: { pid: process.pid, hostname: hostname(), log: 'audit' },
    redact: { paths: REDACT_PATHS, censor: '[Redacted]' }
  }, destination)
  const sonic = destination as DestinationStream & { flushSync?: () => void, reopen?: () => void, file?: unknown }

  function count (d: Denial): void {
    if (d.event === 'auth_failure') metrics.authFailures.labels(d.reason as AuthFailureReason, d.transport).inc()
    else if (d.event === 'forbidden') metrics.forbidden.labels(d.transport).inc()
    else metrics.rateLimited.labels(d.transport).inc()
  }
  return {
    denied (request, d) {
      count(d)
      log.warn({
        component: 'audit',
        event: d.event,
        reason: d.reason,
        sub: d.sub,
        ip: request.ip,
        method: request.method,
        path: pathOf(request.url),
        transport: d.transport,
        status: d.status,
        action: d.action,
        reqId: request.id
      }, 'denied')
    },
    admin (request, event, fields, msg) {
      log.warn({ component: 'audit', event, ...fields, ip: request.ip, reqId: request.id }, msg)
    },
    logout (request, o) {
      metrics.logouts.labels(o.result).inc()
      log.warn({ component: 'audit', event: 'logout', result: o.result, sub: o.sub, sid: o.sid, ip: request.ip, reqId: request.id }, 'back-channel logout')
    },
    flush () {
      try { sonic.flushSync?.() } catch {}
    },
    reopen () {
      if (typeof sonic.file !== 'string') return
      try { sonic.reopen?.() } catch (err) {
        reportFailure('audit log could not be reopened; still writing to the previous file', err as Error)
      }
    }
  }
}

/** A problem of the audit destination itself: on stderr, never inside the audit trail. */
function reportFailure (msg: string, err: Error): void {
  process.stderr.write(`${JSON.stringify({ level: 50, time: Date.now(), pid: process.pid, component: 'audit', msg, err: { message: err.message } })}\n`)
}
