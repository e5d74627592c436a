/**
 * Token revocation: one token (`jti`) or every token of a user issued up to
 * now (`sub`). Revocations live in Redis with a TTL equal to the longest
 * remaining lifetime of any token the gateways have seen (at least
 * REVOCATION_MIN_TTL), and are announced on a pub/sub channel so every
 * replica applies them at once: HTTP requests with such tokens get 401
 * (`reason: revoked`), live WebSockets are closed with 1008.
 *
 * Each replica keeps the active revocations in memory, so the per-request
 * check is a Map lookup. It loads them at start, applies pub/sub messages as
 * they come, and rescans every RESYNC_MS (and after every reconnect) in case
 * a message was missed. Without Redis revocations apply to this process only.
 */
import type { Cluster, Redis } from 'ioredis'
import type { FastifyBaseLogger } from 'fastify'
import type { Identity } from './identity.js'

export const RESYNC_MS = 30_000
/** Revocations held in memory; beyond it the earliest-expiring are dropped (Redis still has them). */
export const MAX_LOCAL_REVOCATIONS = 1_000_000

export type RevocationKind = 'jti' | 'sub'
export interface Revocation {
  kind: RevocationKind
  value: string
  /** For `sub`: tokens issued at or before this second are revoked. */
  at: number
  /** Epoch ms when the revocation lapses (every token it covers has expired). */
  expiresAt: number
}

const MAXEXP_LUA = `
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  return tonumber(ARGV[1])
end
return cur
`
type RevRedis = (Redis | Cluster) & { revMaxExp?: (key: string, exp: number, pxat: number) => Promise<number> }

export interface RevocationOptions {
  redis: Redis | Cluster | undefined
  keyPrefix: string
  minTtlMs: number
  clockToleranceSec: number
  log: FastifyBaseLogger
}

export class Revocations {
  private readonly jtis = new Map<string, number>()
  private readonly subs = new Map<string, { at: number, expiresAt: number }>()
  private readonly listeners: Array<(r: Revocation) => void> = []
  private readonly redis: RevRedis | undefined
  private subscriber: Redis | Cluster | undefined
  private maxExpSeen = 0
  private maxExpPushed = 0
  private timer: NodeJS.Timeout | undefined
  private readonly channel: string

  constructor (private readonly opts: RevocationOptions) {
    this.redis = opts.redis as RevRedis | undefined
    this.channel = `${opts.keyPrefix}revocations`
    if (this.redis !== undefined && this.redis.revMaxExp === undefined) {
      this.redis.defineCommand('revMaxExp', { numberOfKeys: 1, lua: MAXEXP_LUA })
    }
  }

  get size (): number { return this.jtis.size + this.subs.size }

  /** Per-request check: two Map lookups, nothing when there are no revocations. */
  isRevoked (id: Identity, now = Date.now()): boolean {
    if (this.jtis.size === 0 && this.subs.size === 0) return false
    if (id.jti !== undefined) {
      const until = this.jtis.get(id.jti)
      if (until !== undefined) {
        if (until > now) return true
        this.jtis.delete(id.jti)
      }
    }
    const s = this.subs.get(id.sub)
    if (s !== undefined) {
      if (s.expiresAt <= now) { this.subs.delete(id.sub); return false }
      // No iat: cannot prove the token is newer than the revocation.
      return id.iat === undefined || id.iat <= s.at
    }
    return false
  }

  /** Tracks the latest `exp` seen, which sets how long a revocation must live. */
  observe (exp: number): void {
    if (exp <= this.maxExpSeen) return
    this.maxExpSeen = exp
    // Shared with the other replicas, at most once a minute of growth.
    if (this.redis !== undefined && exp > this.maxExpPushed + 60 && this.redis.status === 'ready') {
      this.maxExpPushed = exp
      this.redis.revMaxExp?.(`${this.opts.keyPrefix}rev:maxexp`, exp, exp * 1000).catch(() => {})
    }
  }

  onRevoked (listener: (r: Revocation) => void): void { this.listeners.push(listener) }

  /** Revokes and announces; resolves once stored (Redis) and applied locally. */
  async revoke (kind: RevocationKind, value: string, now = Date.now()): Promise<Revocation> {
    let maxExp = this.maxExpSeen
    if (this.redis?.revMaxExp !== undefined) {
      maxExp = Math.max(maxExp, await this.redis.revMaxExp(`${this.opts.keyPrefix}rev:maxexp`, 0, now + 1000))
    }
    const tolMs = this.opts.clockToleranceSec * 1000
    const ttlMs = Math.max(maxExp * 1000 - now, this.opts.minTtlMs) + tolMs
    const r: Revocation = { kind, value, at: Math.floor(now / 1000), expiresAt: now + ttlMs }
    if (this.redis !== undefined) {
      await this.redis.set(this.key(kind, value), String(r.at), 'PX', ttlMs)
      await this.redis.publish(this.channel, JSON.stringify(r))
    }
    this.apply(r)
    return r
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
      if (channel !== this.channel) return
      try {
        const r = JSON.parse(message) as Revocation
        if ((r.kind === 'jti' || r.kind === 'sub') && typeof r.value === 'string' && Number.isFinite(r.at) && Number.isFinite(r.expiresAt)) this.apply(r)
      } catch {}
    })
    sub.on('ready', () => { this.resync().catch(() => {}) })
    try {
      await sub.connect()
      await sub.subscribe(this.channel)
    } catch (err) {
      this.opts.log.warn({ component: 'revocation', err: { message: (err as Error).message } }, 'revocation channel not subscribed yet; will retry')
    }
    this.timer = setInterval(() => { this.resync().catch(() => {}) }, RESYNC_MS)
    this.timer.unref()
    await this.resync().catch(() => {})
  }

  close (): void {
    clearInterval(this.timer)
    this.subscriber?.disconnect()
  }

  private key (kind: RevocationKind, value: string): string {
    return `${this.opts.keyPrefix}rev:${kind}:${value}`
  }

  private apply (r: Revocation): void {
    if (r.expiresAt <= Date.now()) return
    if (this.jtis.size + this.subs.size >= MAX_LOCAL_REVOCATIONS) this.sweep()
    if (r.kind === 'jti') this.jtis.set(r.value, r.expiresAt)
    else {
      const prev = this.subs.get(r.value)
      if (prev === undefined || prev.at < r.at) this.subs.set(r.value, { at: r.at, expiresAt: Math.max(r.expiresAt, prev?.expiresAt ?? 0) })
    }
    for (const l of this.listeners) l(r)
  }

  private sweep (now = Date.now()): void {
    for (const [k, until] of this.jtis) if (until <= now) this.jtis.delete(k)
    for (const [k, s] of this.subs) if (s.expiresAt <= now) this.subs.delete(k)
  }

  /** Reloads every revocation from Redis (all masters of a cluster). */
  private async resync (): Promise<void> {
    const redis = this.redis
    if (redis === undefined || redis.status !== 'ready') return
    this.sweep()
    const nodes: Redis[] = 'nodes' in redis ? (redis as Cluster).nodes('master') : [redis as Redis]
    const match = `${this.opts.keyPrefix}rev:*`
    for (const node of nodes) {
      let cursor = '0'
      do {
        const [next, keys] = await node.scan(cursor, 'MATCH', match, 'COUNT', 500)
        cursor = next
        for (const key of keys) {
          const rest = key.slice(this.opts.keyPrefix.length + 4)
          const kind = rest.startsWith('jti:') ? 'jti' : rest.startsWith('sub:') ? 'sub' : undefined
          if (kind === undefined) continue
          const [at, ttl] = await Promise.all([node.get(key), node.pttl(key)])
          if (at === null || ttl <= 0) continue
          const r: Revocation = { kind, value: rest.slice(4), at: Number(at), expiresAt: Date.now() + ttl }
          const known = kind === 'jti' ? this.jtis.has(r.value) : this.subs.get(r.value)?.at === r.at
          if (!known) this.apply(r)
        }
      } while (cursor !== '0')
    }
  }
}
