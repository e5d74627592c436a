/**
 * Token revocation: one token (`jti`), every token of a user issued up to
 * a moment (`sub`), or every token of one login session (`sid`, the session
 * id Keycloak puts in its access tokens; back-channel logout). Revocations live in Redis with a TTL equal to the longest
 * remaining lifetime of any token the gateways have seen (at least
 * REVOCATION_MIN_TTL), and are announced on a pub/sub channel so every
 * replica applies them at once: HTTP requests with such tokens get 401
 * (`reason: revoked`), live WebSockets are closed with 1008.
 *
 * Each replica keeps the active revocations in memory, so the per-request
 * check is a Map lookup. It loads them at start, applies pub/sub messages as
 * they come, and rescans every RESYNC_MS (and after every reconnect, once it
 * is subscribed again) in case a message was missed. Without Redis
 * revocations apply to this process only.
 *
 * "At once" across replicas: a pub/sub message reaches the other replicas
 * some time after Redis has answered the publisher (a busy machine can
 * deschedule Redis, or a replica, between the two). So every replica that
 * applies an announced revocation confirms it on a second channel, and
 * revoke() resolves only once as many confirmations have come as PUBLISH
 * counted receivers, or after ACK_TIMEOUT_MS. The admin API and the
 * back-channel logout endpoint answer after that: when they say a token is
 * revoked, every replica listening refuses it. (With Redis Cluster PUBLISH
 * counts only the receivers on the publisher's node, so the others are not
 * waited for.)
 *
 * Readiness (check()): not ready until the first full load from Redis has
 * completed (retried every FIRST_LOAD_RETRY_MS until it has), nor while
 * Redis answers but this replica is not subscribed to the channel (its
 * subscriber connection reconnects on its own), so a replica never takes
 * traffic it would wrongly admit. One exception, by policy: with
 * RATE_LIMIT_ON_STORE_ERROR=open and Redis unreachable the site keeps serving,
 * so the check passes with a detail saying the set is not loaded; it loads as
 * soon as Redis answers (the process is briefly not ready while it does).
 *
 * Every TTL, PX and PXAT sent to Redis is a whole number of milliseconds
 * (Redis answers `ERR value is not an integer` otherwise, and a JWT `exp` may
 * carry a fraction), and no revocation lives longer than MAX_REVOCATION_TTL_MS.
 */
import { randomBytes } from 'node:crypto'
import type { Cluster, Redis } from 'ioredis'
import type { FastifyBaseLogger } from 'fastify'
import type { CheckResult } from '../observability/health.js'
import type { AnnouncementResult } from '../observability/metrics.js'
import { RedisScript } from '../redis-script.js'
import type { Identity } from './identity.js'

export const RESYNC_MS = 30_000
/** Until the first load from Redis has succeeded, it is retried this often. */
export const FIRST_LOAD_RETRY_MS = 1_000
/** How long revoke() waits for the replicas that received the announcement to confirm they applied it. */
export const ACK_TIMEOUT_MS = 1_000
/** Revocations held in memory; beyond it the earliest-expiring are dropped (Redis still has them). */
export const MAX_LOCAL_REVOCATIONS = 1_000_000
/**
 * Hard cap on a revocation's lifetime (plus the clock tolerance), and on how far
 * ahead an `exp` may lie to count when sizing it: 30 days. Access tokens live
 * minutes to hours; an `exp` further ahead (or not a finite number) is still
 * verified as usual but ignored here, so one odd token cannot make every
 * revocation live for years or overflow Redis's expiry arithmetic.
 */
export const MAX_REVOCATION_TTL_MS = 30 * 24 * 3600_000

export const REVOCATION_KINDS = ['jti', 'sub', 'sid'] as const
export type RevocationKind = typeof REVOCATION_KINDS[number]
export interface Revocation {
  kind: RevocationKind
  value: string
  /** For `sub`: tokens issued at or before this second are revoked. */
  at: number
  /** Epoch ms when the revocation lapses (every token it covers has expired). */
  expiresAt: number
  /** `logout`: the issuer ended the session (back-channel logout); WebSockets close with "session ended". */
  cause?: 'logout'
}

export interface RevokeOptions {
  /** Epoch ms of the revocation (default: now). */
  now?: number
  /** For `sub`: tokens issued at or before this second are revoked (default: `now`). */
  at?: number
  cause?: 'logout'
  /** When Redis refuses, revoke in this process anyway (and still reject: the other replicas do not know). */
  localOnFailure?: boolean
}

/** What the channel carries: a revocation, and the id its receivers confirm it with (none from older versions). */
type Announcement = Revocation & { id?: string }

/** A revocation message from the pub/sub channel or Redis, checked field by field. */
function isRevocation (r: Partial<Revocation>): r is Revocation {
  return REVOCATION_KINDS.includes(r.kind as RevocationKind) && typeof r.value === 'string' &&
    Number.isFinite(r.at) && Number.isFinite(r.expiresAt) && (r.cause === undefined || r.cause === 'logout')
}

// KEYS[1] = the shared maximum `exp` (seconds); ARGV = candidate exp, its PXAT (ms), the largest sane exp.
// Returns the maximum after the call. A stored value above the sane bound (written before it existed) or not a
// number counts as none, so the next sane candidate replaces it.
const MAXEXP = new RedisScript<number>(`
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if cur > tonumber(ARGV[3]) then cur = 0 end
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  return tonumber(ARGV[1])
end
return cur
`)

export interface RevocationOptions {
  redis: Redis | Cluster | undefined
  /** Counts what came of each announcement (resonance_revocation_announcements_total). */
  announced?: (result: AnnouncementResult) => void
  keyPrefix: string
  minTtlMs: number
  clockToleranceSec: number
  log: FastifyBaseLogger
}

export class Revocations {
  private readonly jtis = new Map<string, number>()
  private readonly sids = new Map<string, number>()
  private readonly subs = new Map<string, { at: number, expiresAt: number }>()
  private readonly listeners: Array<(r: Revocation) => void> = []
  /** Announcements of this replica waiting for confirmations, by id: called once per confirmation. */
  private readonly pending = new Map<string, () => void>()
  private readonly redis: Redis | Cluster | undefined
  private subscriber: Redis | Cluster | undefined
  private maxExpSeen = 0
  private maxExpPushed = 0
  private timer: NodeJS.Timeout | undefined
  private retry: NodeJS.Timeout | undefined
  private readonly channel: string
  /** Where receivers confirm an announcement (its id). */
  private readonly ackChannel: string
  /** Counts the subscriber's connections ('ready' events); `listeningOn` is the one whose SUBSCRIBE succeeded. */
  private connection = 0
  private listeningOn = -1
  /** The first full load from Redis has completed (always true without Redis). */
  private loadedOnce: boolean
  private loadError: string | undefined
  private resyncing: Promise<void> | undefined
  private closed = false
  /** A connection attempt failed or the connection was lost, and it is not ready again yet (not: still starting). */
  private redisDown = false

  constructor (private readonly opts: RevocationOptions) {
    this.redis = opts.redis
    this.channel = `${opts.keyPrefix}revocations`
    this.ackChannel = `${opts.keyPrefix}revocations:acks`
    this.loadedOnce = this.redis === undefined
    this.redis?.on('reconnecting', () => { this.redisDown = true })
    this.redis?.on('ready', () => { this.redisDown = false })
  }

  get size (): number { return this.jtis.size + this.subs.size + this.sids.size }
  /** Whether the revocations stored in Redis have been loaded at least once. */
  get loaded (): boolean { return this.loadedOnce }

  /**
   * Readiness: ok once the first load has completed. Before that, ok only
   * when Redis is unreachable and the policy is `open` (the site serves
   * anyway; the detail says the set is not loaded).
   */
  check (policy: 'open' | 'closed'): CheckResult {
    const redis = this.redis
    if (this.loadedOnce) {
      if (redis !== undefined && redis.status === 'ready' && !this.listening) {
        return { ok: false, detail: `${this.size} active; not subscribed to the revocation channel yet (its connection: ${this.subscriber?.status ?? 'none'})` }
      }
      return { ok: true, detail: `${this.size} active` }
    }
    const why = this.loadError !== undefined ? `: ${this.loadError}` : ''
    if (redis !== undefined && redis.status !== 'ready' && this.redisDown) {
      return policy === 'open'
        ? { ok: true, detail: `degraded: not loaded, redis ${redis.status}; loaded as soon as Redis answers (RATE_LIMIT_ON_STORE_ERROR=open)` }
        : { ok: false, detail: `not loaded, redis ${redis.status}` }
    }
    return { ok: false, detail: `loading from redis${why}` }
  }

  /** Per-request check: up to three Map lookups, nothing when there are no revocations. */
  isRevoked (id: Identity, now = Date.now()): boolean {
    if (this.jtis.size === 0 && this.subs.size === 0 && this.sids.size === 0) return false
    if (id.jti !== undefined && live(this.jtis, id.jti, now)) return true
    if (id.sid !== undefined && live(this.sids, id.sid, now)) return true
    const s = this.subs.get(id.sub)
    if (s !== undefined) {
      if (s.expiresAt <= now) { this.subs.delete(id.sub); return false }
      // No iat: cannot prove the token is newer than the revocation.
      return id.iat === undefined || id.iat <= s.at
    }
    return false
  }

  /**
   * Tracks the latest `exp` seen (seconds), which sets how long a revocation
   * must live. Called per request: one comparison unless `exp` is a new maximum.
   * An `exp` more than MAX_REVOCATION_TTL_MS ahead, or not finite, is ignored.
   */
  observe (exp: number): void {
    if (!(exp > this.maxExpSeen)) return // also false for NaN
    if (!(exp * 1000 <= Date.now() + MAX_REVOCATION_TTL_MS)) return // also false for Infinity
    // Whole seconds, rounded up: stored in Redis and turned into a PXAT.
    const sec = Math.ceil(exp)
    this.maxExpSeen = sec
    // Shared with the other replicas, at most once a minute of growth.
    if (this.redis !== undefined && sec > this.maxExpPushed + 60 && this.redis.status === 'ready') {
      this.maxExpPushed = sec
      MAXEXP.run(this.redis, [this.maxExpKey()], [sec, sec * 1000, saneMaxExp(Date.now())]).catch(() => {})
    }
  }

  onRevoked (listener: (r: Revocation) => void): void { this.listeners.push(listener) }

  /** Whether this replica hears announcements: its subscriber connection is up and subscribed. */
  private get listening (): boolean {
    return this.subscriber?.status === 'ready' && this.listeningOn === this.connection
  }

  /**
   * Revokes and announces; resolves once stored (Redis), applied locally, and
   * confirmed by every replica that received the announcement (at most
   * ACK_TIMEOUT_MS). Rejects when Redis refuses (applied locally first with
   * `localOnFailure`).
   */
  async revoke (kind: RevocationKind, value: string, opts: RevokeOptions = {}): Promise<Revocation> {
    const now = opts.now ?? Date.now()
    const at = opts.at ?? Math.floor(now / 1000)
    let r: Revocation = this.sized(kind, value, at, now, this.maxExpSeen, opts.cause)
    if (this.redis === undefined) { this.apply(r); return r }
    try {
      // The shared maximum may come from another replica (or an older version that stored any `exp`).
      const shared = Number(await MAXEXP.run(this.redis, [this.maxExpKey()], [0, Math.ceil(now) + 1000, saneMaxExp(now)]))
      if (shared > this.maxExpSeen) r = this.sized(kind, value, at, now, shared, opts.cause)
      await this.redis.set(this.key(kind, value), String(r.at), 'PX', r.expiresAt - Math.ceil(now))
      await this.announce(r)
    } catch (err) {
      if (opts.localOnFailure === true) this.apply(r)
      throw err
    }
    this.apply(r)
    return r
  }

  /**
   * Publishes `r` and waits until the receivers PUBLISH counted (this replica's own subscriber among them) have
   * confirmed it, at most ACK_TIMEOUT_MS. Rejects only when PUBLISH fails.
   */
  private async announce (r: Revocation): Promise<void> {
    const redis = this.redis as Redis | Cluster
    const id = randomBytes(12).toString('hex')
    let confirmed = 0
    let receivers = Infinity
    let done = (): void => {}
    const all = new Promise<void>((resolve) => { done = resolve })
    this.pending.set(id, () => { if (++confirmed >= receivers) done() })
    const timer = setTimeout(() => done(), ACK_TIMEOUT_MS)
    try {
      receivers = await redis.publish(this.channel, JSON.stringify({ ...r, id } satisfies Announcement))
      if (confirmed >= receivers) done()
      await all
    } catch (err) {
      this.opts.announced?.('failed')
      throw err
    } finally {
      clearTimeout(timer)
      this.pending.delete(id)
    }
    this.opts.announced?.(confirmed < receivers ? 'unconfirmed' : 'confirmed')
    if (confirmed < receivers) {
      this.opts.log.warn({ component: 'revocation', receivers, confirmed }, `revocation confirmed by ${confirmed} of ${receivers} receivers within ${ACK_TIMEOUT_MS} ms: the others apply it when the message or their next rescan reaches them`)
    }
  }

  /** A received announcement: applied, then confirmed to its publisher. */
  private receive (message: string): void {
    try {
      const r = JSON.parse(message) as Partial<Announcement>
      const id = r.id
      if (!isRevocation(r)) return
      this.apply(r)
      if (typeof id === 'string' && id.length <= 64) this.redis?.publish(this.ackChannel, id).catch(() => {})
    } catch {}
  }

  /**
   * Subscribes the subscriber's connection number `connection`, then rescans; only then does it count as listening
   * (readiness). Retried every FIRST_LOAD_RETRY_MS until it succeeds or that connection is gone.
   */
  private async listen (connection: number): Promise<void> {
    const sub = this.subscriber
    if (sub === undefined || this.closed || connection !== this.connection) return
    try {
      await sub.subscribe(this.channel, this.ackChannel)
      // A rescan that starts after SUBSCRIBE, not one already running: whatever was announced while this replica could
      // not hear is in Redis by now (the revoker stores before it publishes).
      await this.resyncing?.catch(() => {})
      await this.resync()
    } catch (err) {
      this.opts.log.warn({ component: 'revocation', err: { message: (err as Error).message } }, 'revocation channel not subscribed and rescanned yet; retrying')
      setTimeout(() => { this.listen(connection).catch(() => {}) }, FIRST_LOAD_RETRY_MS).unref()
      return
    }
    if (connection === this.connection) this.listeningOn = connection
  }

  private sized (kind: RevocationKind, value: string, at: number, now: number, maxExp: number, cause: 'logout' | undefined): Revocation {
    const ttlMs = revocationTtlMs(maxExp, now, this.opts.minTtlMs, this.opts.clockToleranceSec)
    return { kind, value, at, expiresAt: Math.ceil(now) + ttlMs, ...(cause !== undefined ? { cause } : {}) }
  }

  async start (): Promise<void> {
    const redis = this.redis
    if (redis === undefined) return
    const sub = 'duplicate' in redis && !('nodes' in redis)
      ? (redis as Redis).duplicate({ enableOfflineQueue: true, lazyConnect: true })
      : (redis as Cluster).duplicate(undefined, { enableOfflineQueue: true, lazyConnect: true })
    this.subscriber = sub
    sub.on('error', () => {}) // the main client logs Redis outages
    sub.on('message', (channel: string, message: string) => {
      if (channel === this.channel) this.receive(message)
      else if (channel === this.ackChannel) this.pending.get(message)?.()
    })
    // Every (re)connection subscribes anew and then rescans; readiness waits for it.
    sub.on('ready', () => { this.listen(++this.connection).catch(() => {}) })
    redis.on('ready', () => {
      // The main client may become ready after the subscriber (resync needs it): load then too.
      this.resync().catch(() => {})
      // Redis is back: the subscriber need not wait out its own reconnect delay.
      if (sub.status === 'reconnecting') sub.connect().catch(() => {})
    })
    try {
      await sub.connect()
    } catch (err) {
      this.opts.log.warn({ component: 'revocation', err: { message: (err as Error).message } }, 'revocation channel not connected yet; will retry')
    }
    this.timer = setInterval(() => { this.resync().catch(() => {}) }, RESYNC_MS)
    this.timer.unref()
    await this.firstLoad()
  }

  close (): void {
    this.closed = true
    clearInterval(this.timer)
    clearTimeout(this.retry)
    this.subscriber?.disconnect()
  }

  /** One load now; until one has succeeded, another every FIRST_LOAD_RETRY_MS (in the background). */
  private async firstLoad (): Promise<void> {
    await this.resync().catch(() => {})
    if (this.loadedOnce || this.closed) return
    this.retry = setTimeout(() => { this.firstLoad().catch(() => {}) }, FIRST_LOAD_RETRY_MS)
    this.retry.unref()
  }

  private key (kind: RevocationKind, value: string): string {
    return `${this.opts.keyPrefix}rev:${kind}:${value}`
  }

  /** The shared maximum `exp` (MAXEXP). */
  private maxExpKey (): string { return `${this.opts.keyPrefix}rev:maxexp` }

  private apply (r: Revocation): void {
    if (r.expiresAt <= Date.now()) return
    if (this.size >= MAX_LOCAL_REVOCATIONS) this.sweep()
    if (r.kind === 'jti') this.jtis.set(r.value, r.expiresAt)
    else if (r.kind === 'sid') this.sids.set(r.value, r.expiresAt)
    else {
      const prev = this.subs.get(r.value)
      if (prev === undefined || prev.at < r.at) this.subs.set(r.value, { at: r.at, expiresAt: Math.max(r.expiresAt, prev?.expiresAt ?? 0) })
    }
    for (const l of this.listeners) l(r)
  }

  private sweep (now = Date.now()): void {
    for (const [k, until] of this.jtis) if (until <= now) this.jtis.delete(k)
    for (const [k, until] of this.sids) if (until <= now) this.sids.delete(k)
    for (const [k, s] of this.subs) if (s.expiresAt <= now) this.subs.delete(k)
  }

  /** Reloads every revocation from Redis (all masters of a cluster); single flight. */
  private resync (): Promise<void> {
    this.resyncing ??= this.scanAll().then(() => {
      if (!this.loadedOnce) this.opts.log.info({ component: 'revocation', active: this.size }, 'revocations loaded')
      this.loadedOnce = true
      this.loadError = undefined
    }, (err: Error) => {
      if (!this.loadedOnce && this.loadError !== err.message) {
        this.opts.log.warn({ component: 'revocation', err: { message: err.message } }, 'revocations not loaded yet; retrying')
      }
      this.loadError = err.message
      throw err
    }).finally(() => { this.resyncing = undefined })
    return this.resyncing
  }

  private async scanAll (): Promise<void> {
    const redis = this.redis
    if (redis === undefined) return
    if (redis.status !== 'ready') throw new Error(`redis ${redis.status}`)
    this.sweep()
    const nodes: Redis[] = 'nodes' in redis ? (redis as Cluster).nodes('master') : [redis as Redis]
    const match = `${this.opts.keyPrefix}rev:*`
    for (const node of nodes) {
      let cursor = '0'
      do {
        const [next, keys] = await node.scan(cursor, 'MATCH', match, 'COUNT', 500)
        cursor = next
        const found: Array<{ kind: RevocationKind, value: string }> = []
        // One round trip per SCAN page (GET + PTTL of each key), not two per key: a large set loads in
        // milliseconds, which is how long a replica waits for it before it is ready.
        const batch = node.pipeline()
        for (const key of keys) {
          const rest = key.slice(this.opts.keyPrefix.length + 4)
          const kind = REVOCATION_KINDS.find((k) => rest.startsWith(`${k}:`))
          if (kind === undefined) continue
          found.push({ kind, value: rest.slice(4) })
          batch.get(key).pttl(key)
        }
        if (found.length === 0) continue
        const replies = await batch.exec()
        const now = Date.now()
        for (const [i, { kind, value }] of found.entries()) {
          const [getErr, at] = replies?.[2 * i] ?? [new Error('no reply')]
          const [ttlErr, ttl] = replies?.[2 * i + 1] ?? [new Error('no reply')]
          if (getErr !== null) throw getErr
          if (ttlErr !== null) throw ttlErr
          if (at === null || typeof ttl !== 'number' || ttl <= 0) continue
          const r: Revocation = { kind, value, at: Number(at), expiresAt: now + ttl }
          const known = kind === 'jti' ? this.jtis.has(r.value) : kind === 'sid' ? this.sids.has(r.value) : this.subs.get(r.value)?.at === r.at
          if (!known) this.apply(r)
        }
      } while (cursor !== '0')
    }
  }
}

/** Whether `key` has a revocation in force at `now` (a lapsed one is dropped). */
function live (revoked: Map<string, number>, key: string, now: number): boolean {
  const until = revoked.get(key)
  if (until === undefined) return false
  if (until > now) return true
  revoked.delete(key)
  return false
}

/** The latest `exp` (whole seconds) that counts when sizing revocations at `now` (epoch ms). */
function saneMaxExp (now: number): number {
  return Math.ceil((now + MAX_REVOCATION_TTL_MS) / 1000)
}

/**
 * How long a revocation made at `now` (epoch ms) must live, in whole
 * milliseconds: until the latest `exp` seen (seconds) has passed, at least
 * `minTtlMs`, at most MAX_REVOCATION_TTL_MS, plus the clock tolerance. A
 * `maxExp` that is not finite counts as none.
 */
export function revocationTtlMs (maxExp: number, now: number, minTtlMs: number, clockToleranceSec: number): number {
  const remaining = Number.isFinite(maxExp) ? maxExp * 1000 - now : 0
  const ttl = Math.min(Math.max(remaining, minTtlMs), MAX_REVOCATION_TTL_MS)
  return Math.ceil(ttl + clockToleranceSec * 1000)
}
