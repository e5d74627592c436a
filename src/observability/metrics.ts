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
  'session_ended',
  'rate_limited',
  'idle_timeout',
  'ping_timeout',
  'message_too_big',
  'shutdown'
] as const
export type WsCloseReason = typeof WS_CLOSE_REASONS[number]

/** Why the public listener closed a new connection at once (resonance_connections_refused_total{reason}). */
export const CONNECTION_REFUSAL_REASONS = ['global', 'per_ip'] as const
export type ConnectionRefusalReason = typeof CONNECTION_REFUSAL_REASONS[number]

/**
 * What became of a back-channel logout request (resonance_backchannel_logouts_total{result}
 * and the `result` of its audit line): accepted, or why it was refused.
 */
export const LOGOUT_RESULTS = [
  'accepted',
  'malformed_request',
  'malformed',
  'alg_not_allowed',
  'unknown_kid',
  'jwks_unavailable',
  'bad_signature',
  'expired',
  'wrong_issuer',
  'wrong_audience',
  'missing_claim',
  'wrong_token_type',
  'missing_event',
  'nonce_present',
  'replayed',
  'store_unavailable'
] as const
export type LogoutResult = typeof LOGOUT_RESULTS[number]

const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

/** Index into STATUS_CLASSES of an HTTP status; anything outside 1xx-5xx counts as 5xx. */
export function statusClassIndex (code: number): number {
  const c = Math.floor(code / 100)
  return c >= 1 && c <= 5 ? c - 1 : 4
}

export type Metrics = ReturnType<typeof createMetrics>

/**
 * Every family of the gateway on a fresh Registry. The builders below register
 * in this order, which is the order of the families on /metrics.
 * `processMetrics: false` leaves out prom-client's process_* and nodejs_*
 * collectors: they start a GC observer and an event-loop-delay timer that
 * nothing stops, so a throwaway gateway (the warm-up) goes without them.
 */
export function createMetrics ({ processMetrics = true }: { processMetrics?: boolean } = {}) {
  const registry = new Registry()
  if (processMetrics) collectDefaultMetrics({ register: registry })
  return {
    registry,
    ...requestMetrics(registry),
    ...denialMetrics(registry),
    ...jwksMetrics(registry),
    ...storeMetrics(registry),
    ...wsMetrics(registry),
    ...connectionMetrics(registry),
    ...logoutMetrics(registry)
  }
}

// Children are resolved once in each builder: no label hashing on the hot path,
// and every series of a closed set exists from the start (dashboards and alerts see zeros).

/** Request duration and count by status class, kept in plain arrays (StatusHistogram). */
function requestMetrics (registry: Registry) {
  // Per-request metrics are kept in plain arrays (a few writes per request) and
  // handed to prom-client when it is scraped: prom-client's own inc()/observe()
  // hash their labels on every call (~5-8 µs per request in the profile).
  const duration = new StatusHistogram(
    'resonance_http_request_duration_seconds',
    'Time from request arrival to the last byte of the response, by status class.')
  registry.registerMetric(duration as unknown as Histogram)
  const exported = new Float64Array(STATUS_CLASSES.length) // request counts already handed to the counter
  const requests = new Counter({
    name: 'resonance_http_requests_total',
    help: 'HTTP requests answered by the gateway (proxied or denied), by status class.',
    labelNames: ['status_class'] as const,
    registers: [registry],
    // The request count per class is the histogram's count: one source, always consistent.
    collect () {
      for (let c = 0; c < STATUS_CLASSES.length; c++) {
        const child = this.labels(STATUS_CLASSES[c] as StatusClass)
        const d = duration.count(c) - exported[c]!
        if (d > 0) { child.inc(d); exported[c] = duration.count(c) }
      }
    }
  })
  for (const c of STATUS_CLASSES) requests.labels(c).inc(0)
  return {
    observeRequest (status: number, seconds: number): void {
      duration.observe(statusClassIndex(status), seconds)
    }
  }
}

/** Requests, upgrades and messages refused (auth, roles, limits) or failed upstream, by transport. */
function denialMetrics (registry: Registry) {
  const authFailures = new Counter({
    name: 'resonance_auth_failures_total',
    help: 'Requests and WebSocket upgrades refused because authentication failed, by reason.',
    labelNames: ['reason', 'transport'] as const,
    registers: [registry]
  })
  const forbidden = closedSetCounter(registry, 'resonance_forbidden_total',
    'Authenticated requests refused with 403 because the caller lacks a required role.', 'transport', TRANSPORTS)
  const rateLimited = closedSetCounter(registry, 'resonance_rate_limit_triggered_total',
    'Requests, upgrades and WebSocket messages refused by a rate limit.', 'transport', TRANSPORTS)
  const upstreamErrors = new Counter({
    name: 'resonance_upstream_errors_total',
    help: 'Failures talking to the app: connect (502), timeout (504), reset and other (502).',
    labelNames: ['kind', 'transport'] as const,
    registers: [registry]
  })
  for (const t of TRANSPORTS) {
    for (const r of AUTH_FAILURE_REASONS) authFailures.labels(r, t).inc(0)
    for (const k of UPSTREAM_ERROR_KINDS) upstreamErrors.labels(k, t).inc(0)
  }
  return { authFailures, forbidden, rateLimited, upstreamErrors }
}

/** The issuer's key set: fetches, keys known, last success. */
function jwksMetrics (registry: Registry) {
  const jwksFetches = closedSetCounter(registry, 'resonance_jwks_fetches_total',
    'JWKS (and discovery) fetches from the issuer, by result.', 'result', JWKS_FETCH_RESULTS)
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
  return { jwksFetches, jwksKeys, jwksLastSuccess }
}

/** The Redis rate-limit store: failed checks and the outage gauge. */
function storeMetrics (registry: Registry) {
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
  return { storeErrors, storeDegraded }
}

/** Proxied WebSockets: open now, messages by direction (plain counts, LocalCount), closes by reason. */
function wsMetrics (registry: Registry) {
  const wsConnections = new Gauge({
    name: 'resonance_ws_connections',
    help: 'WebSocket connections currently proxied.',
    registers: [registry]
  })
  const wsMessagesBy: Record<WsDirection, LocalCount> = { client_to_app: new LocalCount(), app_to_client: new LocalCount() }
  const wsMessages = new Counter({
    name: 'resonance_ws_messages_total',
    help: 'WebSocket messages forwarded, by direction.',
    labelNames: ['direction'] as const,
    registers: [registry],
    collect () { for (const d of WS_DIRECTIONS) this.labels(d).inc(wsMessagesBy[d].take()) }
  })
  const wsCloses = closedSetCounter(registry, 'resonance_ws_closes_total',
    'Proxied WebSocket connections that ended, by reason.', 'reason', WS_CLOSE_REASONS)
  for (const d of WS_DIRECTIONS) wsMessages.labels(d).inc(0)
  return { wsConnections, wsMessages: wsMessagesBy, wsCloses }
}

/** The public listener's connections: refused at once, open now. */
function connectionMetrics (registry: Registry) {
  const connectionsRefused = closedSetCounter(registry, 'resonance_connections_refused_total',
    'Client connections closed at once by the public listener: over MAX_CONNECTIONS (global) or over MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP (per_ip).',
    'reason', CONNECTION_REFUSAL_REASONS)
  // Read from the listener's own count at scrape time (connections.ts sets the source).
  let openConnections: () => number = () => 0
  const connectionsOpen = new Gauge({
    name: 'resonance_connections_open',
    help: 'Client connections open on the public listener (HTTP keep-alive and WebSocket included).',
    registers: [registry],
    collect () { this.set(openConnections()) }
  })
  return {
    connectionsRefused,
    connectionsOpen,
    /** Where resonance_connections_open reads its value. */
    countOpenConnections (source: () => number): void { openConnections = source }
  }
}

/** A count kept in a plain number; prom-client takes the increase at scrape time (take()). */
class LocalCount {
  private n = 0
  inc (by = 1): void { this.n += by }
  take (): number {
    const n = this.n
    this.n = 0
    return n
  }
}

/**
 * The request-duration histogram by status class, in prom-client's metric
 * interface (name, help, type, get(), reset()) so the Registry exports it
 * exactly like one of its own Histograms.
 */
class StatusHistogram {
  readonly type = 'histogram'
  readonly aggregator = 'sum'
  readonly labelNames = ['status_class'] as const
  /** Per status class: one slot per bucket (value <= bound) plus +Inf. */
  private readonly buckets = STATUS_CLASSES.map(() => new Float64Array(LATENCY_BUCKETS.length + 1))
  private readonly sums = new Float64Array(STATUS_CLASSES.length)
  private readonly counts = new Float64Array(STATUS_CLASSES.length)

  constructor (readonly name: string, readonly help: string) {}

  observe (cls: number, seconds: number): void {
    let i = 0
    while (i < LATENCY_BUCKETS.length && seconds > (LATENCY_BUCKETS[i] as number)) i++
    ;(this.buckets[cls] as Float64Array)[i]!++
    this.sums[cls]! += seconds
    this.counts[cls]!++
  }

  count (cls: number): number { return this.counts[cls] as number }

  async get (): Promise<{ name: string, help: string, type: string, aggregator: string, values: Array<{ labels: Record<string, string | number>, value: number, metricName: string }> }> {
    const values = []
    for (let c = 0; c < STATUS_CLASSES.length; c++) {
      const cls = STATUS_CLASSES[c] as StatusClass
      const b = this.buckets[c] as Float64Array
      let cumulative = 0
      for (let i = 0; i < LATENCY_BUCKETS.length; i++) {
        cumulative += b[i] as number
        values.push({ labels: { le: LATENCY_BUCKETS[i] as number, status_class: cls }, value: cumulative, metricName: `${this.name}_bucket` })
      }
      cumulative += b[LATENCY_BUCKETS.length] as number
      values.push({ labels: { le: '+Inf', status_class: cls }, value: cumulative, metricName: `${this.name}_bucket` })
      values.push({ labels: { status_class: cls }, value: this.sums[c] as number, metricName: `${this.name}_sum` })
      values.push({ labels: { status_class: cls }, value: this.counts[c] as number, metricName: `${this.name}_count` })
    }
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values }
  }

  reset (): void {
    for (const b of this.buckets) b.fill(0)
    this.sums.fill(0)
    this.counts.fill(0)
  }
}

/**
 * What came of this replica's revocation announcements (auth/revocation.ts): `confirmed` by every receiver Redis
 * counted, `unconfirmed` (some did not confirm within the wait), `failed` (PUBLISH failed).
 */
export const ANNOUNCEMENT_RESULTS = ['confirmed', 'unconfirmed', 'failed'] as const
export type AnnouncementResult = typeof ANNOUNCEMENT_RESULTS[number]

/** Back-channel logouts received from the issuer (auth/logout.ts), and revocation announcements (auth/revocation.ts). */
function logoutMetrics (registry: Registry) {
  const logouts = closedSetCounter(registry, 'resonance_backchannel_logouts_total',
    'Back-channel logout requests from the issuer, by result (accepted, or why the logout token was refused).', 'result', LOGOUT_RESULTS)
  const announcements = closedSetCounter(registry, 'resonance_revocation_announcements_total',
    'Revocations this replica announced to the others, by result: confirmed by every receiver, unconfirmed (some did not confirm within 1 s), failed (not published).',
    'result', ANNOUNCEMENT_RESULTS)
  return { logouts, announcements }
}

/** A counter over one label whose values are a closed set: every series exists from the start, at 0. */
function closedSetCounter<L extends string> (registry: Registry, name: string, help: string, label: L, values: readonly string[]): Counter<L> {
  const counter = new Counter({ name, help, labelNames: [label] as const, registers: [registry] })
  for (const v of values) counter.labels(v).inc(0)
  return counter
}
