/**
 * The counting store behind every limit, in @fastify/rate-limit's store
 * interface (incr(key, cb, windowMs, max) -> { current, ttl }).
 *
 * With Redis it counts with BatchedRedisStore (redis-batch.ts): the plugin's
 * RedisStore semantics (INCR + PEXPIRE on the first hit, atomic per key,
 * shared by every replica, Redis Cluster safe), but the increments of one
 * event-loop turn share one script call. Without Redis, in-process
 * counters (local-counter.ts: the plugin's LocalStore semantics, bounded LRU).
 *
 * When Redis fails (down, restarting, slower than the command timeout) the
 * store never hangs a request: the error is counted, logged once per outage,
 * and the policy decides:
 *   open   - count in a per-process LocalCounter against RATE_LIMIT_FALLBACK_MAX
 *            (default: the normal budget), so a user cannot run unlimited;
 *   closed - fail the call; the caller answers 503 + Retry-After.
 * After a failure Redis is skipped for a short breaker interval (so a slow
 * Redis does not cost every request the full timeout), then one request at a
 * time probes it; the first success ends the outage.
 *
 * The outage (resonance_rate_limit_store_degraded, one log line when it starts
 * and one when it ends) also begins when the connection is lost or a readiness
 * PING fails, so it shows without traffic; it ends when a command or PING
 * succeeds or the connection is ready again. Readiness (check()) follows the
 * policy: with `open` the site keeps serving, so an outage is reported in the
 * detail but the process stays ready (otherwise every replica would turn
 * unready at once and the Service would have no endpoints); with `closed`
 * requests get 503, so the process is not ready.
 *
 * child() returns the same store: keys are fully built by the caller, so GET
 * and POST of one user share one budget (the plugin's child() would prefix
 * `${method}${url}` and split them).
 */
import type { FastifyBaseLogger } from 'fastify'
import type { Cluster, Redis } from 'ioredis'
import type { Metrics } from '../observability/metrics.js'
import type { StoreErrorPolicy } from '../config/settings.js'
import type { CheckResult } from '../observability/health.js'
import { LocalCounter } from './local-counter.js'
import { BatchedRedisStore, type IncrCallback } from './redis-batch.js'
import { redisCheck } from './redis.js'
import { STORE_UNAVAILABLE } from '../errors.js'

export type { Hits, IncrCallback } from './redis-batch.js'
interface StoreLike { incr (key: string, cb: IncrCallback, windowMs: number, max: number): void }

/** Entries kept by in-process counters (LRU): bounds memory under key floods. */
export const LOCAL_STORE_ENTRIES = 100_000
/** After a Redis failure, go straight to the fallback for this long. */
export const BREAKER_MS = 1_000

export interface LimitStoreOptions {
  redis: Redis | Cluster | undefined
  keyPrefix: string
  policy: StoreErrorPolicy
  /** Budget per window in fallback mode; undefined = the normal one. */
  fallbackMax: number | undefined
  metrics: Metrics
  log: FastifyBaseLogger
}

export class LimitStore {
  private readonly redisStore: StoreLike | undefined
  private readonly local: StoreLike
  private readonly fallback: StoreLike
  private degradedUntil = 0
  private degraded = false
  private probing = false
  /** A connection attempt failed or the connection was lost, and it is not ready again yet. */
  private down = false

  constructor (private readonly opts: LimitStoreOptions) {
    this.redisStore = opts.redis !== undefined ? new BatchedRedisStore(opts.redis, opts.keyPrefix) : undefined
    this.local = new LocalCounter(LOCAL_STORE_ENTRIES)
    this.fallback = new LocalCounter(LOCAL_STORE_ENTRIES)
    // 'reconnecting' only follows a lost or refused connection (never a deliberate disconnect at shutdown).
    opts.redis?.on('reconnecting', () => {
      this.down = true
      this.unavailable(undefined)
    })
    opts.redis?.on('ready', () => {
      this.down = false
      if (this.degraded) this.recovered()
    })
  }

  /** True while Redis is considered unavailable and the policy applies. */
  get isDegraded (): boolean { return this.degraded }

  /**
   * Readiness of the store: a PING within the command timeout. On failure the
   * outage is recorded (gauge, log line); with policy `open` the check still
   * passes with a `degraded:` detail, with `closed` it fails.
   */
  async check (): Promise<CheckResult> {
    const redis = this.opts.redis
    if (redis === undefined) return { ok: true, detail: 'in-process limits' }
    const r = await redisCheck(redis)
    if (r.ok) {
      if (this.degraded) this.recovered()
      return r
    }
    // The first connection attempt still running (or not begun): starting up, not an outage.
    if (!this.down && redis.status !== 'ready') return { ok: false, detail: `${r.detail ?? 'redis not connected'}; connecting` }
    this.unavailable(undefined)
    return this.opts.policy === 'open'
      ? { ok: true, detail: `degraded: ${r.detail ?? 'redis unavailable'}; limits per process (RATE_LIMIT_ON_STORE_ERROR=open)` }
      : { ok: false, detail: `${r.detail ?? 'redis unavailable'}; requests refused (RATE_LIMIT_ON_STORE_ERROR=closed)` }
  }

  incr (key: string, cb: IncrCallback, windowMs: number, max: number): void {
    const redisStore = this.redisStore
    if (redisStore === undefined) return this.local.incr(key, cb, windowMs, max)
    if (this.opts.redis?.status !== 'ready') return this.failed(key, cb, windowMs, max, undefined)
    // Degraded: after the breaker interval ONE request probes Redis (half-open);
    // the others keep the fallback until it answers, so a hung Redis costs one
    // request the command timeout, not every request.
    const probe = this.degraded
    if (probe) {
      if (this.probing || Date.now() < this.degradedUntil) return this.failed(key, cb, windowMs, max, undefined)
      this.probing = true
    }
    redisStore.incr(key, (err, res) => {
      if (probe) this.probing = false
      if (err !== null || res === undefined) {
        // Only a real failed attempt re-arms the breaker: calls inside the
        // interval must not push it forward, or steady traffic never retries Redis.
        this.degradedUntil = Date.now() + BREAKER_MS
        return this.failed(key, cb, windowMs, max, err ?? undefined)
      }
      if (this.degraded) this.recovered()
      cb(null, res)
    }, windowMs, max)
  }

  /** @fastify/rate-limit calls this for per-route limiters; our keys are already complete. */
  child (): this { return this }

  private failed (key: string, cb: IncrCallback, windowMs: number, max: number, err: Error | undefined): void {
    this.opts.metrics.storeErrors.inc()
    this.unavailable(err)
    if (this.opts.policy === 'closed') return cb(STORE_UNAVAILABLE)
    const fallbackMax = this.opts.fallbackMax
    if (fallbackMax === undefined || fallbackMax >= max) return this.fallback.incr(key, cb, windowMs, max)
    // Scale so that `current > max` (the plugin's test) trips after fallbackMax hits.
    this.fallback.incr(key, (e, res) => {
      if (e !== null || res === undefined) return cb(e)
      cb(null, { current: Math.ceil(res.current * max / fallbackMax), ttl: res.ttl })
    }, windowMs, fallbackMax)
  }

  /** Starts an outage: gauge 1 and one log line (nothing when one is already on). */
  private unavailable (err: Error | undefined): void {
    if (this.degraded) return
    this.degraded = true
    this.opts.metrics.storeDegraded.set(1)
    this.opts.log.error({ component: 'rate-limit', policy: this.opts.policy, err: err !== undefined ? { message: err.message } : undefined },
      this.opts.policy === 'open'
        ? 'rate-limit store unavailable: serving with per-process fallback limits'
        : 'rate-limit store unavailable: refusing requests (503) until it is back')
  }

  private recovered (): void {
    this.degraded = false
    this.degradedUntil = 0
    this.opts.metrics.storeDegraded.set(0)
    this.opts.log.info({ component: 'rate-limit' }, 'rate-limit store available again: shared limits resumed')
  }
}
