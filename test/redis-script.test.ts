// RedisScript (src/redis-script.ts), the one way src/ runs a Lua script, against real redis-servers, no mocks:
//   (a) NOSCRIPT recovery: the first call on a server is EVALSHA refused with NOSCRIPT plus one EVAL; after SCRIPT FLUSH
//       (on the test's own connection) the next call still answers correctly the same way, and the one after is a
//       plain EVALSHA again;
//   (b) any other error (here a script error) is passed through as it is: no EVAL retry;
//   (c) the scripts of Revocations (the shared maximum `exp`) and ConnectionSlots (connection leases) keep working
//       after SCRIPT FLUSH, with their state: the revocation is sized by the maximum stored before the flush, the
//       slot cap still counts the leases taken before it; nothing is defined on the client (no defineCommand);
//   (d) Redis Cluster (3 masters): keys in every node's slots run through the Cluster client (ioredis routes EVALSHA
//       and EVAL by key), and after SCRIPT FLUSH on every node each node recovers with one EVAL of its own.
// Every server here is private to this file (SCRIPT FLUSH would disturb other test files on the shared Redis).
import { createRequire } from 'node:module'
import t, { type Test } from 'tap'
import { Redis, type Cluster } from 'ioredis'
import { pino } from 'pino'
import { RedisScript } from '../src/redis-script.js'
import { Revocations } from '../src/auth/revocation.js'
import { ConnectionSlots } from '../src/limits/ws.js'
import { connectRedis, createRedis } from '../src/limits/redis.js'
import { createMetrics } from '../src/observability/metrics.js'
import { startRedisCluster, startRedisServer, type RedisServer } from './helpers/redis.js'
import { attempts, commandStats, delta, type CmdStat } from './helpers/redis-stats.js'

const log = pino({ level: 'silent' })
const calculateSlot = createRequire(import.meta.url)('cluster-key-slot') as (key: string) => number

// INCRBY KEYS[1] by ARGV[1] and return the new value: its effect shows whether the script ran, and ran once.
const INCR_BY = new RedisScript<number>("return redis.call('INCRBY', KEYS[1], ARGV[1])")

async function privateRedis (tt: Test): Promise<RedisServer> {
  const server = await startRedisServer()
  tt.teardown(async () => { await server.stop() })
  return server
}

/** The gateway's own client (createRedis: no offline queue, fail-fast timeouts), connected. */
async function gatewayClient (tt: Test, settings: { url?: string, clusterNodes?: string[] }): Promise<Redis | Cluster> {
  const redis = createRedis({ url: settings.url, clusterNodes: settings.clusterNodes ?? [] }, log)
  if (redis === undefined) throw new Error('no redis client')
  tt.teardown(() => { redis.disconnect() })
  await connectRedis(redis)
  if (redis.status !== 'ready') throw new Error(`redis ${redis.status}`)
  return redis
}

/** A plain connection of the test's own (INFO, SCRIPT FLUSH, GET). */
async function ownConnection (tt: Test, port: number): Promise<Redis> {
  const c = new Redis(port, '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 1 })
  await c.connect()
  tt.teardown(() => { c.disconnect() })
  return c
}

/** EVALSHA and EVAL as the server counted them between two snapshots. */
function scriptCommands (before: Record<string, CmdStat>, after: Record<string, CmdStat>): { evalsha: CmdStat, eval: CmdStat } {
  return { evalsha: delta(before, after, 'evalsha'), eval: delta(before, after, 'eval') }
}

/** One EVALSHA refused with NOSCRIPT (an attempt that failed or was rejected, as the server version counts it). */
function refusedOnce (tt: Test, d: CmdStat, what: string): void {
  tt.equal(attempts(d), 1, `${what}: one EVALSHA ...`)
  tt.equal(d.failed + d.rejected, 1, `${what}: ... refused (NOSCRIPT)`)
}

const ONE_EVAL = { calls: 1, rejected: 0, failed: 0 }
const EVALSHA_ONLY = { evalsha: { calls: 1, rejected: 0, failed: 0 }, eval: { calls: 0, rejected: 0, failed: 0 } }

// --- (a) NOSCRIPT recovery ---------------------------------------------------------------------------------------------

t.test('NOSCRIPT: EVAL once on a server without the script, and again after SCRIPT FLUSH; EVALSHA otherwise', async (t) => {
  const server = await privateRedis(t)
  const redis = await gatewayClient(t, { url: server.url })
  const own = await ownConnection(t, server.port)

  t.equal(INCR_BY.sha, await own.script('LOAD', "return redis.call('INCRBY', KEYS[1], ARGV[1])") as string, 'sha is the SHA1 Redis computes')
  await own.script('FLUSH')

  const s0 = await commandStats(own)
  t.equal(await INCR_BY.run(redis, ['n'], [5]), 5, 'first call on a fresh server: correct reply')
  const s1 = await commandStats(own)
  refusedOnce(t, delta(s0, s1, 'evalsha'), 'first call')
  t.same(delta(s0, s1, 'eval'), ONE_EVAL, 'first call: then one EVAL')

  t.equal(await INCR_BY.run(redis, ['n'], [1]), 6)
  const s2 = await commandStats(own)
  t.same(scriptCommands(s1, s2), EVALSHA_ONLY, 'the EVAL cached the script: the next call is a plain EVALSHA')

  await own.script('FLUSH') // on the test's own connection: the gateway's client does not know
  t.equal(await INCR_BY.run(redis, ['n'], [10]), 16, 'after SCRIPT FLUSH the call still answers, and ran once')
  const s3 = await commandStats(own)
  refusedOnce(t, delta(s2, s3, 'evalsha'), 'after the flush')
  t.same(delta(s2, s3, 'eval'), ONE_EVAL, 'after the flush: then one EVAL')

  t.equal(await INCR_BY.run(redis, ['n'], [1]), 17)
  t.same(scriptCommands(s3, await commandStats(own)), EVALSHA_ONLY, 'EVALSHA again')
  t.equal(await own.get('n'), '17', 'every call counted exactly once')
})

// --- (b) other errors --------------------------------------------------------------------------------------------------

t.test('an error other than NOSCRIPT is passed through, without an EVAL retry', async (t) => {
  const server = await privateRedis(t)
  const redis = await gatewayClient(t, { url: server.url })
  const own = await ownConnection(t, server.port)
  await own.set('text', 'not-a-number')
  await INCR_BY.run(redis, ['warm'], [1]) // script cached

  const before = await commandStats(own)
  await t.rejects(INCR_BY.run(redis, ['text'], [1]), /not an integer/, 'the script\'s own error reaches the caller')
  const after = await commandStats(own)
  t.equal(attempts(delta(before, after, 'evalsha')), 1, 'one EVALSHA')
  t.equal(attempts(delta(before, after, 'eval')), 0, 'no EVAL retry')
  t.equal(await own.get('text'), 'not-a-number')
})

// --- (c) the gateway's scripts after SCRIPT FLUSH ---------------------------------------------------------------------

t.test('Revocations and ConnectionSlots keep working across SCRIPT FLUSH, with their state', async (t) => {
  const server = await privateRedis(t)
  const redis = await gatewayClient(t, { url: server.url })
  const own = await ownConnection(t, server.port)
  const defined: string[] = [] // commands defined on the shared client (there must be none)
  const defineCommand = redis.defineCommand.bind(redis)
  redis.defineCommand = (name, definition) => { defined.push(name); defineCommand(name, definition) }

  await t.test('Revocations: the revocation is sized by the shared maximum exp stored before the flush', async (tt) => {
    const revocations = new Revocations({ redis, keyPrefix: 'rev-test:', minTtlMs: 60_000, clockToleranceSec: 0, log })
    tt.teardown(() => { revocations.close() })
    const first = await revocations.revoke('jti', 'one') // runs the maximum-exp script: caches it
    tt.ok(first.expiresAt - Date.now() <= 60_000, 'no exp seen yet: the minimum TTL')
    const exp = Math.ceil(Date.now() / 1000) + 3600
    await own.set('rev-test:rev:maxexp', String(exp), 'PXAT', exp * 1000) // as another replica would have stored it

    await own.script('FLUSH')
    const r = await revocations.revoke('sub', 'someone')
    tt.ok(Math.abs(r.expiresAt - exp * 1000) <= 1000, `the revocation lives until the shared exp (${r.expiresAt} vs ${exp * 1000})`)
    const pttl = await own.pttl('rev-test:rev:sub:someone')
    tt.ok(pttl > 3_500_000 && pttl <= 3_601_000, `stored with that TTL (${pttl} ms)`)
    tt.equal(await own.get('rev-test:rev:maxexp'), String(exp), 'the shared maximum is left as it was')
  })

  await t.test('ConnectionSlots: the cap still counts the leases taken before the flush', async (tt) => {
    const slots = new ConnectionSlots(redis, 'slots-test:', () => 2, 'closed', createMetrics(), log)
    tt.teardown(() => { slots.close() })
    const a = await slots.acquire('u')
    const b = await slots.acquire('u')
    tt.same([a.result, b.result], ['ok', 'ok'])

    await own.script('FLUSH')
    tt.equal((await slots.acquire('u')).result, 'full', 'a third slot is refused: the script ran, with the stored leases')
    tt.equal(await own.zcard('slots-test:wsconn:u'), 2)
    slots.release('u', a.id)
    await own.script('FLUSH')
    const c = await slots.acquire('u')
    tt.equal(c.result, 'ok', 'a released slot is granted again')
    tt.same((await own.zrange('slots-test:wsconn:u', '0', '-1')).sort(), [b.id, c.id].sort())
    const pttl = await own.pttl('slots-test:wsconn:u')
    tt.ok(pttl > 0 && pttl <= 60_000, `the lease key has its TTL (${pttl} ms)`)
  })

  t.same(defined, [], 'no command was defined on the shared client')
})

// --- (d) Redis Cluster ---------------------------------------------------------------------------------------------------

t.test('Redis Cluster: routed by key to every master; each node recovers from SCRIPT FLUSH with its own EVAL', async (t) => {
  const cluster = await startRedisCluster(3)
  t.teardown(async () => { await cluster.stop() })
  const redis = await gatewayClient(t, { clusterNodes: cluster.seeds.split(',') })
  const nodes = await Promise.all(cluster.nodes.map((n) => ownConnection(t, n.port)))

  // One key per master, chosen from the slot ranges the masters report.
  const ranges = await nodes[0]?.cluster('SLOTS') ?? []
  const keys = cluster.nodes.map((n) => {
    const range = ranges.find((r) => r[2]?.[1] === n.port)
    if (range === undefined) throw new Error(`node ${n.port} owns no slots`)
    for (let i = 0; ; i++) {
      const slot = calculateSlot(`script-test:${i}`)
      if (slot >= range[0] && slot <= range[1]) return `script-test:${i}`
    }
  })

  const run = async (by: number): Promise<number[]> => await Promise.all(keys.map((k) => INCR_BY.run(redis, [k], [by])))
  t.same(await run(1), [1, 1, 1], 'first calls answered on every node')
  for (const [i, node] of nodes.entries()) t.equal(await node.get(keys[i] as string), '1', `node ${i + 1} holds its key`)

  await Promise.all(nodes.map((n) => n.script('FLUSH')))
  const before = await Promise.all(nodes.map((n) => commandStats(n)))
  t.same(await run(10), [11, 11, 11], 'after SCRIPT FLUSH on every node the calls still answer, each ran once')
  const mid = await Promise.all(nodes.map((n) => commandStats(n)))
  for (const [i] of nodes.entries()) {
    refusedOnce(t, delta(before[i] ?? {}, mid[i] ?? {}, 'evalsha'), `node ${i + 1}`)
    t.same(delta(before[i] ?? {}, mid[i] ?? {}, 'eval'), ONE_EVAL, `node ${i + 1}: then its own EVAL`)
  }
  t.same(await run(1), [12, 12, 12])
  const after = await Promise.all(nodes.map((n) => commandStats(n)))
  for (const [i] of nodes.entries()) t.same(scriptCommands(mid[i] ?? {}, after[i] ?? {}), EVALSHA_ONLY, `node ${i + 1}: EVALSHA again`)
})
