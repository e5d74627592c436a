/**
 * Signing keys from the issuer's JWKS, pinned by configuration: JWKS_URL, or
 * the jwks_uri that OIDC discovery on the *configured* issuer advertises
 * (discovery through get-jwks). Never a location taken from a token.
 *
 * Why not get-jwks' per-kid cache: it re-converts the JWK to PEM on every call
 * (~450 µs a request, measured with get-jwks 11 and @fastify/jwt 10), has no negative cache (every made-up kid
 * is a JWKS fetch), and drops keys one ttl after the endpoint goes down. This
 * store keeps the whole key set, prepared once per kid, and:
 *   - answers known kids synchronously (the hot path is a Map lookup);
 *   - refreshes in the background when the set is older than cacheTtl, and
 *     keeps serving the last good set while the endpoint is down;
 *   - on an unknown kid refetches at most once per minRefreshInterval, all
 *     concurrent misses sharing that one fetch (single flight); other unknown
 *     kids are refused meanwhile (negative cache by time);
 *   - after a failed fetch (discovery or JWKS) makes no new attempt of any kind
 *     (background, stale set, unknown kid, periodic timer) before a backoff:
 *     minRefreshInterval (1 s when 0) doubling per consecutive failure, capped
 *     at cacheTtl and at JWKS_MAX_BACKOFF_MS, reset by the next success. An
 *     outage costs the issuer a handful of requests per process whatever the
 *     request rate, instead of one per request once the set is stale;
 *   - bounds every fetch: undici connect/headers/body timeouts that fire, and a
 *     body size cap.
 */
import { createPublicKey } from 'node:crypto'
import { Agent, request } from 'undici'
import buildGetJwks from 'get-jwks'
import type { FastifyBaseLogger } from 'fastify'
import type { CheckResult } from '../observability/health.js'
import type { Metrics } from '../observability/metrics.js'
import { DiscoveryFailedError, JwksUnavailableError } from '../errors.js'
import { tokenHeader } from './token.js'

export const MAX_JWKS_BYTES = 1024 * 1024
export const MAX_JWKS_KEYS = 100
/** Longest pause between two attempts while the issuer keeps failing (also never longer than cacheTtl). */
export const JWKS_MAX_BACKOFF_MS = 5 * 60_000
/** First pause after a failure when JWKS_MIN_REFRESH_INTERVAL is 0. */
export const JWKS_MIN_BACKOFF_MS = 1_000

/**
 * The pause after `failures` consecutive failed fetches: `base` (the minimum
 * refresh interval, or JWKS_MIN_BACKOFF_MS when that is 0) doubled per further
 * failure, at most max(base, min(cacheTtl, JWKS_MAX_BACKOFF_MS)). Capping at
 * cacheTtl keeps the retry cadence during an outage no slower than the normal
 * refresh cadence, so keys are fresh again within one cacheTtl of the issuer's
 * recovery.
 */
export function jwksBackoffMs (failures: number, minRefreshIntervalMs: number, cacheTtlMs: number): number {
  if (failures <= 0) return 0
  const base = minRefreshIntervalMs > 0 ? minRefreshIntervalMs : JWKS_MIN_BACKOFF_MS
  const cap = Math.max(base, Math.min(cacheTtlMs, JWKS_MAX_BACKOFF_MS))
  return Math.min(cap, base * 2 ** Math.min(failures - 1, 30))
}

export interface KeyStoreOptions {
  issuer: string
  jwksUrl: string | undefined
  cacheTtlMs: number
  minRefreshIntervalMs: number
  fetchTimeoutMs: number
  metrics: Metrics
  log: FastifyBaseLogger
}

export interface PreparedKey {
  kid: string | undefined
  /** SPKI PEM, computed once; @fastify/jwt caches one verifier per PEM string. */
  pem: string
  /** The JWK's alg, when it pins one. */
  alg: string | undefined
  kty: string
}

export type KeyResult =
  | { key: PreparedKey }
  | { error: 'unknown_kid' | 'jwks_unavailable' }

export class KeyStore {
  private keys = new Map<string, PreparedKey>()
  private loadedAt = 0
  private lastAttempt = 0
  /** Consecutive failed fetches; 0 after a success. */
  private failures = 0
  /** After a failure: no attempt of any kind before this time (epoch ms). */
  private retryAt = 0
  private inflight: Promise<void> | undefined
  private jwksUri: string | undefined
  private readonly agent: Agent
  private readonly getJwks: ReturnType<typeof buildGetJwks>
  private lastError: string | undefined
  private timer: NodeJS.Timeout | undefined
  private readonly issuerBase: string

  constructor (private readonly opts: KeyStoreOptions) {
    const t = opts.fetchTimeoutMs
    this.agent = new Agent({ connect: { timeout: t }, headersTimeout: t, bodyTimeout: t, connections: 4 })
    this.jwksUri = opts.jwksUrl
    this.issuerBase = opts.issuer.replace(/\/+$/, '')
    // get-jwks' own `timeout` option is ignored and an AbortSignal in
    // fetchOptions would be reused after it fired; a dispatcher with timeouts works.
    this.getJwks = buildGetJwks({
      providerDiscovery: true,
      issuersWhitelist: [opts.issuer.replace(/\/+$/, '')],
      fetchOptions: { dispatcher: this.agent } as never
    })
  }

  /** True once a key set has been loaded (readiness). */
  get ready (): boolean { return this.loadedAt > 0 }
  get size (): number { return this.keys.size }
  get error (): string | undefined { return this.lastError }
  /** Consecutive failed fetches, and how long until the next attempt is allowed (0: now). */
  get backoff (): { failures: number, retryInMs: number } {
    return { failures: this.failures, retryInMs: Math.max(0, this.retryAt - Date.now()) }
  }

  /**
   * Readiness: ready once a key set has loaded. A failing refresh after that
   * keeps the process ready (the last good set serves known kids) and shows
   * in the detail, with the backoff.
   */
  check (): CheckResult {
    const { failures, retryInMs } = this.backoff
    const failing = failures > 0
      ? `${this.lastError ?? 'fetch failed'}; ${failures} failed attempt${failures === 1 ? '' : 's'}, next in ${Math.ceil(retryInMs / 1000)} s`
      : undefined
    if (this.ready) {
      return { ok: true, detail: failing === undefined ? `${this.size} keys` : `${this.size} keys; refresh failing: ${failing}` }
    }
    return { ok: false, detail: failing ?? 'not loaded yet' }
  }

  /** Whether a key for this kid/alg is in the current set (never fetches). */
  has (kid: string | undefined, alg: string): boolean {
    return this.find(kid, alg) !== undefined
  }

  /**
   * Whether a JWT's key is in the current set under `allowed` algorithms,
   * read from its header alone (never fetches, no signature check): what an
   * address over the failed-token limit may still have verified.
   */
  hasKeyFor (token: string, allowed: ReadonlySet<string>): boolean {
    const h = tokenHeader(token)
    if (h === undefined || typeof h.alg !== 'string' || !allowed.has(h.alg)) return false
    if (h.kid !== undefined && typeof h.kid !== 'string') return false
    return this.has(h.kid, h.alg)
  }

  /**
   * The key for a token header. Synchronous for known kids; otherwise a
   * promise that resolves after at most one shared refetch.
   */
  lookup (kid: string | undefined, alg: string): KeyResult | Promise<KeyResult> {
    const now = Date.now()
    const hit = this.find(kid, alg)
    if (hit !== undefined) {
      if (now - this.loadedAt > this.opts.cacheTtlMs && this.due(now)) this.refresh(now).catch(() => {})
      return { key: hit }
    }
    // An unknown kid joins a fetch in flight; otherwise it may start one only
    // outside the failure backoff and the negative-cache interval.
    if (this.inflight === undefined && (!this.due(now) || now - this.lastAttempt < this.opts.minRefreshIntervalMs)) {
      return { error: this.ready ? 'unknown_kid' : 'jwks_unavailable' }
    }
    return this.refresh(now).then(() => {
      const key = this.find(kid, alg)
      if (key !== undefined) return { key }
      return { error: this.ready ? 'unknown_kid' : 'jwks_unavailable' }
    })
  }

  /** Whether a new fetch may start now: none in flight, and outside the failure backoff. */
  private due (now: number): boolean {
    return this.inflight === undefined && now >= this.retryAt
  }

  /**
   * Loads the key set (single flight); never rejects, failures are kept for
   * readiness. Callers check due() first: this method itself ignores the
   * backoff, so that start() always makes its first attempt.
   */
  refresh (now = Date.now()): Promise<void> {
    if (this.inflight !== undefined) return this.inflight
    this.lastAttempt = now
    this.inflight = this.fetchKeys()
      .then((keys) => {
        this.keys = keys
        this.loadedAt = Date.now()
        this.lastError = undefined
        if (this.failures > 0) this.opts.log.info({ failures: this.failures, keys: keys.size }, 'jwks refresh succeeded again')
        this.failures = 0
        this.retryAt = 0
        this.opts.metrics.jwksFetches.labels('ok').inc()
        this.opts.metrics.jwksKeys.set(keys.size)
        this.opts.metrics.jwksLastSuccess.set(this.loadedAt / 1000)
        this.opts.log.debug({ keys: keys.size }, 'jwks loaded')
      }, (err: Error) => {
        this.opts.metrics.jwksFetches.labels('error').inc()
        this.failures++
        const backoffMs = jwksBackoffMs(this.failures, this.opts.minRefreshIntervalMs, this.opts.cacheTtlMs)
        // Counted from the end of the failed attempt: a fetch that hung until its timeout does not shorten the pause.
        this.retryAt = Date.now() + backoffMs
        if (this.lastError !== err.message) {
          // One line per distinct problem, not per attempt.
          this.opts.log.error({ err: { message: err.message, code: (err as { code?: string }).code }, failures: this.failures, retryInMs: backoffMs },
            this.ready ? 'jwks refresh failed; serving the last good key set' : 'jwks fetch failed')
        }
        this.lastError = err.message
        if (this.jwksUri !== this.opts.jwksUrl) this.jwksUri = undefined // rediscover next time
      })
      .finally(() => { this.inflight = undefined })
    return this.inflight
  }

  /**
   * Loads the key set now and keeps it fresh: retries until the first load
   * succeeds, then refreshes whenever the set is older than cacheTtl, both
   * within the failure backoff. Requests never wait for this; they keep using
   * the last good set.
   */
  start (): Promise<void> {
    const every = Math.max(1000, Math.min(this.opts.minRefreshIntervalMs || 1000, this.opts.cacheTtlMs))
    this.timer = setInterval(() => {
      const now = Date.now()
      if ((!this.ready || now - this.loadedAt > this.opts.cacheTtlMs) && this.due(now)) this.refresh(now).catch(() => {})
    }, every)
    this.timer.unref()
    return this.refresh()
  }

  async close (): Promise<void> {
    clearInterval(this.timer)
    await this.inflight
    await this.agent.close()
  }

  private find (kid: string | undefined, alg: string): PreparedKey | undefined {
    if (kid !== undefined) {
      const k = this.keys.get(kid)
      return k !== undefined && (k.alg === undefined || k.alg === alg) ? k : undefined
    }
    // No kid in the token: acceptable only when exactly one key can match.
    let only: PreparedKey | undefined
    for (const k of this.keys.values()) {
      if (k.alg !== undefined && k.alg !== alg) continue
      if (!ktyFits(k.kty, alg)) continue
      if (only !== undefined) return undefined
      only = k
    }
    return only
  }

  private async discover (): Promise<string> {
    if (this.jwksUri !== undefined) return this.jwksUri
    let uri: string
    try {
      uri = await this.getJwks.getJwksUri(this.issuerBase + '/')
    } catch (err) {
      throw new DiscoveryFailedError(`${this.issuerBase}/.well-known/openid-configuration: ${(err as Error).message}`)
    }
    try {
      const u = new URL(uri)
      if (u.protocol !== 'https:' && u.protocol !== 'http:') throw new Error('not http(s)')
    } catch {
      throw new DiscoveryFailedError(`jwks_uri ${JSON.stringify(uri)} is not an http(s) URL`)
    }
    this.jwksUri = uri
    return uri
  }

  private async fetchKeys (): Promise<Map<string, PreparedKey>> {
    const uri = await this.discover()
    const t = this.opts.fetchTimeoutMs
    let res
    try {
      res = await request(uri, {
        dispatcher: this.agent,
        headersTimeout: t,
        bodyTimeout: t,
        headers: { accept: 'application/json, application/jwk-set+json' }
      })
    } catch (err) {
      throw new JwksUnavailableError(`${uri}: ${(err as Error).message}`)
    }
    const chunks: Buffer[] = []
    let size = 0
    for await (const chunk of res.body) {
      size += (chunk as Buffer).length
      if (size > MAX_JWKS_BYTES) {
        res.body.destroy()
        throw new JwksUnavailableError(`${uri}: response larger than ${MAX_JWKS_BYTES} bytes`)
      }
      chunks.push(chunk as Buffer)
    }
    if (res.statusCode !== 200) throw new JwksUnavailableError(`${uri}: HTTP ${res.statusCode}`)
    let body: unknown
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'))
    } catch {
      throw new JwksUnavailableError(`${uri}: not JSON`)
    }
    const jwks = (body as { keys?: unknown }).keys
    if (!Array.isArray(jwks)) throw new JwksUnavailableError(`${uri}: no "keys" array`)
    const keys = new Map<string, PreparedKey>()
    for (const jwk of jwks.slice(0, MAX_JWKS_KEYS)) {
      const key = prepare(jwk)
      if (key !== undefined) keys.set(key.kid ?? `#${keys.size}`, key)
    }
    if (keys.size === 0) throw new JwksUnavailableError(`${uri}: no usable signing key`)
    return keys
  }
}

/** A JWK as a ready PEM, or undefined for encryption keys and what we cannot use. */
function prepare (jwk: unknown): PreparedKey | undefined {
  if (typeof jwk !== 'object' || jwk === null) return undefined
  const j = jwk as Record<string, unknown>
  if (j.use !== undefined && j.use !== 'sig') return undefined
  if (j.kty !== 'RSA' && j.kty !== 'EC' && j.kty !== 'OKP') return undefined
  if (j.d !== undefined) return undefined // never accept private material
  try {
    const pem = createPublicKey({ key: j as never, format: 'jwk' }).export({ type: 'spki', format: 'pem' }).toString()
    return {
      kid: typeof j.kid === 'string' ? j.kid : undefined,
      pem,
      alg: typeof j.alg === 'string' ? j.alg : undefined,
      kty: j.kty
    }
  } catch {
    return undefined
  }
}

function ktyFits (kty: string, alg: string): boolean {
  if (alg.startsWith('RS') || alg.startsWith('PS')) return kty === 'RSA'
  if (alg.startsWith('ES')) return kty === 'EC'
  return alg === 'EdDSA' && kty === 'OKP'
}
