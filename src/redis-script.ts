/**
 * Lua scripts on Redis, the one way the gateway runs them (rate-limit batches,
 * WebSocket connection slots, the revocations' shared maximum `exp`): EVALSHA,
 * and once EVAL when the server answers NOSCRIPT because it does not hold the
 * script (never ran it, or lost it: a restart, SCRIPT FLUSH, a failover to a
 * replica that never ran it). The EVAL caches it there, so the next call is
 * EVALSHA again. Nothing is defined on the shared client (no ioredis
 * defineCommand): a script is a value any module can run on any client.
 *
 * Redis Cluster: ioredis routes EVALSHA and EVAL by their first key, so a call
 * needs at least one key and all its keys in one hash slot (one key, or keys
 * split by slot as limits/redis-batch.ts does); each node caches the script on
 * its own first NOSCRIPT.
 *
 * A top-level module (like errors.ts): auth and limits both use it, and
 * neither folder may import the other's way round.
 */
import { createHash } from 'node:crypto'
import type { Cluster, Redis } from 'ioredis'

export class RedisScript<Reply = unknown> {
  /** SHA1 of the source: the script's name for EVALSHA. */
  readonly sha: string

  constructor (readonly lua: string) {
    this.sha = createHash('sha1').update(lua).digest('hex')
  }

  /** Runs the script with KEYS = `keys` and ARGV = `args` on `redis`; resolves with its reply. */
  async run (redis: Redis | Cluster, keys: readonly string[], args: ReadonlyArray<string | number>): Promise<Reply> {
    const params = [...keys, ...args]
    try {
      return await redis.evalsha(this.sha, keys.length, ...params) as Reply
    } catch (err) {
      if (!isNoScript(err)) throw err
      return await redis.eval(this.lua, keys.length, ...params) as Reply
    }
  }
}

/** Redis's answer to EVALSHA of a script it does not hold ("NOSCRIPT No matching script..."). */
function isNoScript (err: unknown): boolean {
  return err instanceof Error && err.message.startsWith('NOSCRIPT')
}
