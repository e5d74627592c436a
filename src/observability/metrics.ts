/**
 * Prometheus metrics on a private Registry per gateway (tests never share
 * counters). Every label value comes from a closed set declared here; sub, IP,
 * path and token never become labels (they go to the audit log).
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

export const TRANSPORTS = ['http', 'ws'] as const
export type Transport = typeof TRANSPORTS[number]

/** Why authentication failed: the `reason` label and audit field of auth_failure. */
export const AUTH_FAILURE_REASONS = [
  'missing_token',
  'malformed',
  'multiple_tokens',
  'insecure_transport',
  'alg_not_allowed',
  'unknown_kid',
  'jwks_unavailable',
  'bad_signature',
  'expired',
  'not_yet_valid',
  'wrong_issuer',
  'wrong_audience',
  'missing_claim',
  'wrong_token_type',
  'revoked',
  'invalid_path'
] as const
export type AuthFailureReason = typeof AUTH_FAILURE_REASONS[number]

export const STATUS_CLASSES = ['1xx', '2xx', '3xx', '4xx', '5xx'] as const
export type StatusClass = typeof STATUS_CLASSES[number]

export const UPSTREAM_ERROR_KINDS = ['connect', 'timeout', 'reset', 'other'] as const
export type UpstreamErrorKind = typeof UPSTREAM_ERROR_KINDS[number]

export const JWKS_FETCH_RESULTS = ['ok', 'error'] as const
export type JwksFetchResult = typeof JWKS_FETCH_RESULTS[number]

export const WS_DIRECTIONS = ['client_to_app', 'app_to_client'] as const
export type WsDirection = typeof WS_DIRECTIONS[number]

/** Why a proxied WebSocket ended (resonance_ws_closes_total{reason}). */
export const WS_CLOSE_REASONS = [
  'client_closed',
  'upstream_closed',
  'upstream_error',
  'client_error',
  'token_expired',
  'revoked',
  'rate_limited',
  'idle_timeout',
  'ping_timeout',
  'message_too_big',
  'shutdown'
] as const
export type WsCloseReason = typeof WS_CLOSE_REASONS[number]

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

export function statusClass (code: number): StatusClass {
  const c = Math.floor(code / 100)
  return (c >= 1 && c <= 5 ? `${c}xx` : '5xx') as StatusClass
}

export type Metrics = ReturnType<typeof createMetrics>

export function createMetrics () {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry })

  const requests = new Counter({
    name: 'resonance_http_requests_total',
    help: 'HTTP requests answered by the gateway (proxied or denied), by status class.',
    labelNames: ['status_class'] as const,
    registers: [registry]
  })
  const duration = new Histogram({
    name: 'resonance_http_request_duration_seconds',
    help: 'Time from request arrival to the last byte of the response, by status class.',
    labelNames: ['status_class'] as const,
    buckets: LATENCY_BUCKETS,
    registers: [registry]
  })
  const authFailures = new Counter({
    name: 'resonance_auth_failures_total',
    help: 'Requests and WebSocket upgrades refused because authentication failed, by reason.',
    labelNames: ['reason', 'transport'] as const,
    registers: [registry]
  })
  const forbidden = new Counter({
    name: 'resonance_forbidden_total',
    help: 'Authenticated requests refused with 403 because the caller lacks a required role.',
    labelNames: ['transport'] as const,
    registers: [registry]
  })
  const rateLimited = new Counter({
    name: 'resonance_rate_limit_triggered_total',
    help: 'Requests, upgrades and WebSocket messages refused by a rate limit.',
    labelNames: ['transport'] as const,
    registers: [registry]
  })
  const upstreamErrors = new Counter({
    name: 'resonance_upstream_errors_total',
    help: 'Failures talking to the app: connect (502), timeout (504), reset and other (502).',
    labelNames: ['kind', 'transport'] as const,
    registers: [registry]
  })
  const jwksFetches = new Counter({
    name: 'resonance_jwks_fetches_total',
    help: 'JWKS (and discovery) fetches from the issuer, by result.',
    labelNames: ['result'] as const,
    registers: [registry]
  })
  const jwksKeys = new Gauge({
    name: 'resonance_jwks_keys',
    help: 'Signing keys currently known from the issuer JWKS.',
    registers: [registry]
  })
  const jwksLastSuccess = new Gauge({
    name: 'resonance_jwks_last_success_timestamp_seconds',
    help: 'Unix time of the last successful JWKS fetch.',
    registers: [registry]
  })

  const storeErrors = new Counter({
    name: 'resonance_rate_limit_store_errors_total',
    help: 'Rate-limit checks that could not use Redis (command failed or timed out, or Redis unavailable) and applied RATE_LIMIT_ON_STORE_ERROR instead.',
    registers: [registry]
  })
  const storeDegraded = new Gauge({
    name: 'resonance_rate_limit_store_degraded',
    help: '1 while the Redis rate-limit store is unavailable and the fallback policy applies.',
    registers: [registry]
  })
  const wsConnections = new Gauge({
    name: 'resonance_ws_connections',
    help: 'WebSocket connections currently proxied.',
    registers: [registry]
  })
  const wsMessages = new Counter({
    name: 'resonance_ws_messages_total',
    help: 'WebSocket messages forwarded, by direction.',
    labelNames: ['direction'] as const,
    registers: [registry]
  })
  const wsCloses = new Counter({
    name: 'resonance_ws_closes_total',
    help: 'Proxied WebSocket connections that ended, by reason.',
    labelNames: ['reason'] as const,
    registers: [registry]
  })

  // Children resolved once: no label hashing on the hot path, and every series
  // of a closed set exists from the start (dashboards and alerts see zeros).
  const byStatus = Object.fromEntries(STATUS_CLASSES.map((s) => [s, {
    requests: requests.labels(s),
    duration: duration.labels(s)
  }])) as Record<StatusClass, { requests: Counter.Internal, duration: Histogram.Internal<'status_class'> }>
  for (const t of TRANSPORTS) {
    for (const r of AUTH_FAILURE_REASONS) authFailures.labels(r, t).inc(0)
    forbidden.labels(t).inc(0)
    rateLimited.labels(t).inc(0)
    for (const k of UPSTREAM_ERROR_KINDS) upstreamErrors.labels(k, t).inc(0)
  }
  for (const r of JWKS_FETCH_RESULTS) jwksFetches.labels(r).inc(0)
  const wsMessagesBy = {
    client_to_app: wsMessages.labels('client_to_app'),
    app_to_client: wsMessages.labels('app_to_client')
  } satisfies Record<WsDirection, Counter.Internal>
  for (const c of Object.values(wsMessagesBy)) c.inc(0)
  for (const r of WS_CLOSE_REASONS) wsCloses.labels(r).inc(0)

  return {
    registry,
    observeRequest (status: number, seconds: number): void {
      const s = byStatus[statusClass(status)]
      s.requests.inc()
      s.duration.observe(seconds)
    },
    authFailures,
    forbidden,
    rateLimited,
    upstreamErrors,
    jwksFetches,
    jwksKeys,
    jwksLastSuccess,
    storeErrors,
    storeDegraded,
    wsConnections,
    wsMessages: wsMessagesBy,
    wsCloses
  }
}
