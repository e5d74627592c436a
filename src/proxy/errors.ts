/**
 * Upstream failures as the client sees them: 502 when the app cannot be
 * reached or broke the connection, 504 when it did not answer in time. Never a
 * 500, never the internal error text (the answers: http/answers.ts).
 */
import type { UpstreamErrorKind } from '../observability/metrics.js'

export function upstreamErrorKind (err: unknown): UpstreamErrorKind {
  const codes: string[] = []
  for (let e = err as { code?: unknown, cause?: unknown } | undefined, i = 0; e !== undefined && e !== null && i < 5; e = e.cause as typeof e, i++) {
    if (typeof e.code === 'string') codes.push(e.code)
  }
  if (codes.some((c) => c === 'UND_ERR_HEADERS_TIMEOUT' || c === 'UND_ERR_BODY_TIMEOUT' || c === 'UND_ERR_CONNECT_TIMEOUT' ||
    c === 'FST_REPLY_FROM_GATEWAY_TIMEOUT' || c === 'FST_REPLY_FROM_TIMEOUT' || c === 'ETIMEDOUT')) return 'timeout'
  if (codes.some((c) => c === 'ECONNREFUSED' || c === 'ENOTFOUND' || c === 'EAI_AGAIN' || c === 'EHOSTUNREACH' ||
    c === 'ENETUNREACH' || c === 'FST_REPLY_FROM_SERVICE_UNAVAILABLE')) return 'connect'
  if (codes.some((c) => c === 'ECONNRESET' || c === 'UND_ERR_SOCKET' || c === 'EPIPE')) return 'reset'
  return 'other'
}

export function upstreamErrorStatus (kind: UpstreamErrorKind): 502 | 504 {
  return kind === 'timeout' ? 504 : 502
}
