/**
 * The shared Redis connection (rate limits, WebSocket connection slots,
 * revocations, readiness). Configured to
 * fail fast instead of hanging requests (with ioredis' defaults, an offline queue
 * and 20 retries per command, requests hang while Redis is down): no offline queue (a
 * command while disconnected errors at once, and nothing replays into the
 * wrong window after a reconnect), one retry per command, bounded connect and
 * command timeouts. No auto-pipelining: rate-limit checks are already batched
 * into one script call per event-loop turn (redis-batch.ts), and ioredis' auto-
 * pipeline would add a Pipeline object per command and make queued commands
 * start their timeout only after the running pipeline's. Reconnects forever with backoff; the
 * outage is logged once, and the recovery once.
 */
import { Cluster, Redis, type RedisOptions } from 'ioredis'
import type { FastifyBaseLogger } from 'fastify'
import type { CheckResult } from '../observability/health.js'

export const REDIS_CONNECT_TIMEOUT_MS = 1_000
export const REDIS_COMMAND_TIMEOUT_MS = 500
const MAX_RECONNECT_DELAY_MS = 2_000

const FAIL_FAST: RedisOptions = {
  lazyConnect: true,
  enableOfflineQueue: false,
  maxRetriesPerRequest: 1,
  connectTimeout: REDIS_CONNECT_TIMEOUT_MS,
  commandTimeout: REDIS_COMMAND_TIMEOUT_MS,
  enableAutoPipelining: false,
  retryStrategy: (times) => Math.min(times * 100, MAX_RECONNECT_DELAY_MS)
}

export interface RedisSettings { url: string | undefined, clusterNodes: string[] }

/** Credentials, TLS and db from a redis:// or rediss:// URL, for cluster nodes. */
function optionsFromUrl (url: string | undefined): RedisOptions {
  if (url === undefined) return {}
  const u = new URL(url)
  const opts: RedisOptions = {}
  if (u.username !== '') opts.username = decodeURIComponent(u.username)
  if (u.password !== '') opts.password = decodeURIComponent(u.password)
  if (u.protocol === 'rediss:') opts.tls = {}
  return opts
}

function nodeOf (entry: string): { host: string, port: number } {
  const hp = entry.replace(/^rediss?:\/\/(?:[^@/]*@)?/, '').replace(/\/$/, '')
  const i = hp.lastIndexOf(':')
  return { host: hp.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(hp.slice(i + 1)) }
}

/** A Redis or Redis Cluster client, or undefined when none is configured. */
export function createRedis (settings: RedisSettings, log: FastifyBaseLogger): Redis | Cluster | undefined {
  let redis: Redis | Cluster
  if (settings.clusterNodes.length > 0) {
    const { retryStrategy: _r, ...nodeOptions } = FAIL_FAST
    redis = new Cluster(settings.clusterNodes.map(nodeOf), {
      lazyConnect: true,
      enableOfflineQueue: false,
      enableAutoPipelining: false,
      clusterRetryStrategy: (times) => Math.min(times * 100, MAX_RECONNECT_DELAY_MS),
      redisOptions: { ...nodeOptions, ...optionsFromUrl(settings.url) }
    })
  } else if (settings.url !== undefined) {
    redis = new Redis(settings.url, FAIL_FAST)
  } else {
    return undefined
  }
  let down = false
  redis.on('error', (err: Error & { code?: string }) => {
    lastErrors.set(redis, err.message)
    if (down) return
    down = true
    log.error({ component: 'redis', err: { message: err.message, code: err.code } }, 'redis unavailable')
  })
  redis.on('ready', () => {
    lastErrors.delete(redis)
    if (down) log.info({ component: 'redis' }, 'redis available again')
    down = false
  })
  return redis
}

/** The last connection error of each client made by createRedis, until it is ready again (readiness detail). */
const lastErrors = new WeakMap<Redis | Cluster, string>()

/** Readiness: a PING answered within the command timeout. */
export async function redisCheck (redis: Redis | Cluster): Promise<CheckResult> {
  if (redis.status !== 'ready') {
    const last = lastErrors.get(redis)
    return { ok: false, detail: `redis ${redis.status}${last !== undefined ? ` (${last})` : ''}` }
  }
  try {
    await redis.ping()
    return { ok: true }
  } catch (err) {
    return { ok: false, detail: (err as Error).message }
  }
}

/** Connects without throwing: an unreachable Redis shows in /readyz and logs, not as a crash. */
export async function connectRedis (redis: Redis | Cluster): Promise<void> {
  try {
    await redis.connect()
  } catch {
    // the 'error' listener logged it; ioredis keeps reconnecting
  }
}
