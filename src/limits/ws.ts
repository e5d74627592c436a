/**
 * WebSocket limits beyond the upgrade itself:
 *  - messages: each client-to-app message counts against a per-user budget
 *    in the shared store (all of the user's connections, all replicas);
 *  - connections: at most WS_MAX_CONNECTIONS_PER_USER open at once across
 *    replicas, as leases in a Redis sorted set (one key per user, so Cluster
 *    safe). Each replica refreshes its leases; a replica that dies stops
 *    refreshing and its slots expire after LEASE_MS.
 * Without Redis both are per process. When Redis fails, the store's policy
 * applies to messages; connection slots fall back to per-process counting
 * (open) or refuse (closed). What a session does with them (admission,
 * message order, the close/drop policy) is in ./ws-gate.ts.
 */
import { randomBytes } from 'node:crypto'
import type { Cluster, Redis } from 'ioredis'
import type { FastifyBaseLogger } from 'fastify'
import type { StoreErrorPolicy } from '../config/settings.js'
import type { Metrics } from '../observability/metrics.js'
import { RedisScript } from '../redis-script.js'
import type { LimitStore } from './store.js'

export const LEASE_MS = 60_000
const REFRESH_MS = LEASE_MS / 3

// KEYS[1] = the user's leases; ARGV = now, the lease's expiry (ms), its id, the cap, the key's TTL (ms).
// Returns {granted (1 or 0), leases held after the call}.
const ACQUIRE = new RedisScript<[number, number]>(`
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[4]) then return {0, n} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, n + 1}
`)

export interface MessageVerdict { allowed: boolean, retryAfterSec: number }

export class WsMessageLimiter {
  /** `limit` is read per message, so a config reload applies to open connections too. */
  constructor (private readonly store: LimitStore, private readonly limit: () => { max: number, windowMs: number }) {}

  /** Counts one message of `sub`; the in-process store answers synchronously (inside this call). */
  check (sub: string, cb: (err: Error | null, verdict?: MessageVerdict) => void): void {
    const { max, windowMs } = this.limit()
    this.store.incr(`wsmsg:${sub}`, (err, res) => {
      if (err !== null || res === undefined) return cb(err ?? new Error('no result'))
      cb(null, { allowed: res.current <= max, retryAfterSec: Math.max(1, Math.ceil(res.ttl / 1000)) })
    }, windowMs, max)
  }
}

export type SlotResult = 'ok' | 'full' | 'unavailable'

export class ConnectionSlots {
  /** sub -> lease ids held by this process */
  private readonly local = new Map<string, Set<string>>()
  private readonly timer: NodeJS.Timeout

  constructor (
    private readonly redis: Redis | Cluster | undefined,
    private readonly prefix: string,
    /** Read per upgrade (reloadable). */
    private readonly max: () => number,
    private readonly policy: StoreErrorPolicy,
    private readonly metrics: Metrics,
    private readonly log: FastifyBaseLogger
  ) {
    this.timer = setInterval(() => { this.refresh() }, REFRESH_MS)
    this.timer.unref()
  }

  private key (sub: string): string { return `${this.prefix}wsconn:${sub}` }

  /** Takes a slot for one connection; release it with the returned id. */
  async acquire (sub: string): Promise<{ result: SlotResult, id: string }> {
    // 96 random bits as one flat string (randomUUID's string is ~15 joined pieces: ~0.5 KiB per open connection)
    const id = randomBytes(12).toString('base64url')
    const held = this.local.get(sub)
    const redis = this.redis
    if (redis !== undefined && redis.status === 'ready') {
      try {
        const now = Date.now()
        const [granted] = await ACQUIRE.run(redis, [this.key(sub)], [now, now + LEASE_MS, id, this.max(), LEASE_MS])
        if (granted !== 1) return { result: 'full', id }
        this.hold(sub, id)
        return { result: 'ok', id }
      } catch (err) {
        this.metrics.storeErrors.inc()
        this.log.debug({ component: 'ws-slots', err: { message: (err as Error).message } }, 'connection slot store error')
      }
    }
    if (redis !== undefined && this.policy === 'closed') return { result: 'unavailable', id }
    if ((held?.size ?? 0) >= this.max()) return { result: 'full', id }
    this.hold(sub, id)
    return { result: 'ok', id }
  }

  release (sub: string, id: string): void {
    const held = this.local.get(sub)
    held?.delete(id)
    if (held?.size === 0) this.local.delete(sub)
    if (this.redis?.status === 'ready') this.redis.zrem(this.key(sub), id).catch(() => {})
  }

  close (): void { clearInterval(this.timer) }

  private hold (sub: string, id: string): void {
    let held = this.local.get(sub)
    if (held === undefined) { held = new Set(); this.local.set(sub, held) }
    held.add(id)
  }

  /** Extends this replica's leases (re-adding any that expired during a Redis outage: the connections are live). */
  private refresh (): void {
    const redis = this.redis
    if (redis === undefined || redis.status !== 'ready' || this.local.size === 0) return
    const expires = Date.now() + LEASE_MS
    for (const [sub, ids] of this.local) {
      const key = this.key(sub)
      for (const id of ids) redis.zadd(key, expires, id).catch(() => {})
      redis.pexpire(key, LEASE_MS).catch(() => {})
    }
  }
}
