// BatchedRedisStore (src/limits/redis-batch.ts) against real redis-servers, no mocks:
//   (a) exactness: 1000 concurrent increments of one key through two stores on two clients return exactly 1..1000
//       and Redis holds 1000;
//   (b) batching: 600 increments in one event-loop turn cost exactly ceil(600/256) = 3 EVALSHA on the server (measured
//       as INFO commandstats deltas on a private redis-server, so parallel test files cannot disturb the count);
//   (c) windows: the first hit sets a TTL in (0, window], returned ttls are in (0, window], a key left without a TTL
//       gets one again (the repair), and an elapsed window starts counting from 1;
//   (d) SCRIPT FLUSH: the NOSCRIPT fallback (EVAL) answers correctly, and the next batch is EVALSHA again;
//   (e) errors: an unreachable server and a frozen (SIGSTOP) one give EVERY callback of a batch an Error, in bounded
//       time, and the store works again once Redis is back.
// The shared Redis is used with DB 11 and a per-test key prefix; only those keys are deleted.
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { Redis } from 'ioredis'
import { BatchedRedisStore, MAX_BATCH } from '../src/limits/redis-batch.js'
import type { Hits } from '../src/limits/store.js'
import { freePort } from './helpers/ports.js'
import { deleteKeys, redisUrl, startRedisServer, type RedisServer } from './helpers/redis.js'
import { attempts, commandStats, delta } from './helpers/redis-stats.js'
import { within } from './helpers/wait.js'

const WINDOW_MS = 60_000

// --- helpers -----------------------------------------------------------------------------------------------------------

type Outcome = { err: Error, hits?: undefined } | { err?: undefined, hits: Hits }

/** One increment as a promise that resolves with what the callback received (never rejects). */
function incr (store: BatchedRedisStore, key: string, windowMs = WINDOW_MS, max = 1_000_000): Promise<Outcome> {
  return new Promise((resolve) => {
    store.incr(key, (err, hits) => {
      if (err !== null) resolve({ err })
      else if (hits === undefined) resolve({ err: new Error('callback without error and without hits') })
      else resolve({ hits })
    }, windowMs, max)
  })
}

function hitsOf (tt: Test, outcomes: Outcome[]): Hits[] {
  const failed = outcomes.filter((o) => o.err !== undefined)
  tt.equal(failed.length, 0, `no increment failed${failed[0]?.err !== undefined ? ` (first: ${failed[0].err.message})` : ''}`)
  return outcomes.flatMap((o) => o.hits === undefined ? [] : [o.hits])
}

async function client (tt: Test, url: string): Promise<Redis> {
  const c = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1 })
  await c.connect()
  tt.teardown(() => { c.disconnect() })
  return c
}

/** A unique key prefix on the shared Redis; its keys are deleted when the test ends. */
function freshPrefix (tt: Test, cleaner: Redis): string {
  const prefix = `test:redis-batch:${randomUUID()}:`
  tt.teardown(async () => { await deleteKeys(cleaner, prefix) })
  return prefix
}

async function privateRedis (tt: Test): Promise<RedisServer> {
  const server = await startRedisServer()
  tt.teardown(async () => {
    try { process.kill(server.process.pid ?? 0, 'SIGCONT') } catch {}
    await server.stop()
  })
  return server
}

let shared: string
t.before(async () => { shared = await redisUrl() })

// --- (a) exactness -----------------------------------------------------------------------------------------------------

t.test('exact: 1000 concurrent increments of one key via two stores on two clients return exactly 1..1000', async (t) => {
  const [c1, c2] = await Promise.all([client(t, shared), client(t, shared)])
  const prefix = freshPrefix(t, c1)
  const stores = [new BatchedRedisStore(c1, prefix), new BatchedRedisStore(c2, prefix)]

  const pending: Array<Promise<Outcome>> = []
  const perStore = [0, 0]
  for (let i = 0; i < 1000; i++) {
    const which = Math.random() < 0.5 ? 0 : 1
    perStore[which] = (perStore[which] ?? 0) + 1
    pending.push(incr(stores[which] as BatchedRedisStore, 'same-key'))
    // several event-loop turns, so batches of both clients interleave on the server (no reply is awaited)
    if (i % 150 === 149) await new Promise((resolve) => setImmediate(resolve))
  }
  t.ok((perStore[0] ?? 0) > 0 && (perStore[1] ?? 0) > 0, `both stores used (${perStore.join(' / ')})`)

  const hits = hitsOf(t, await within(Promise.all(pending), 10_000, '1000 increments answered'))
  t.equal(hits.length, 1000)
  const currents = hits.map((h) => h.current).sort((a, b) => a - b)
  t.same(currents, Array.from({ length: 1000 }, (_, i) => i + 1), 'currents are exactly 1..1000: no duplicate, none missing')
  t.ok(hits.every((h) => h.ttl > 0 && h.ttl <= WINDOW_MS), 'every returned ttl is in (0, window]')
  t.equal(await c1.get(`${prefix}same-key`), '1000', 'Redis holds 1000')
  const pttl = await c1.pttl(`${prefix}same-key`)
  t.ok(pttl > 0 && pttl <= WINDOW_MS, `the key has its window (${pttl} ms)`)
})

// --- (b) batching ------------------------------------------------------------------------------------------------------

t.test('batching: 600 increments in one event-loop turn cost exactly 3 EVALSHA on the server', async (t) => {
  t.equal(MAX_BATCH, 256, 'MAX_BATCH as documented')
  const server = await privateRedis(t)
  const c = await client(t, server.url)
  const admin = await client(t, server.url) // INFO on its own connection
  const store = new BatchedRedisStore(c, 'batch:')

  // warm-up: load the script (NOSCRIPT -> EVAL caches it) so the measured calls are plain EVALSHA
  hitsOf(t, [await incr(store, 'warm')])

  const before = await commandStats(admin)
  const pending: Array<Promise<Outcome>> = []
  for (let i = 0; i < 600; i++) pending.push(incr(store, `k${i % 300}`)) // 300 keys, 2 increments each
  const hits = hitsOf(t, await within(Promise.all(pending), 10_000, '600 increments answered'))
  const after = await commandStats(admin)

  const evalsha = delta(before, after, 'evalsha')
  const evalPlain = delta(before, after, 'eval')
  t.equal(attempts(evalsha) + attempts(evalPlain), Math.ceil(600 / MAX_BATCH), 'ceil(600/256) = 3 script calls in all')
  t.equal(evalsha.calls, 3, '3 EVALSHA')
  t.equal(evalsha.failed + evalsha.rejected, 0, 'none failed (the script was cached)')
  t.equal(attempts(evalPlain), 0, 'no EVAL fallback')
  t.equal(delta(before, after, 'incr').calls, 600, 'all 600 INCRs ran inside those scripts')
  // every key was counted twice, in order
  const wrong = Array.from({ length: 300 }, (_, k) => k).filter((k) => hits[k]?.current !== 1 || hits[k + 300]?.current !== 2)
  t.same(wrong, [], 'every key counted 1 then 2, in order')
  t.equal(await c.get('batch:k299'), '2')
})

// --- (c) windows -------------------------------------------------------------------------------------------------------

t.test('windows: TTL on the first hit, ttls within the window, TTL repair, a new window counts from 1', async (t) => {
  const c = await client(t, shared)
  const prefix = freshPrefix(t, c)
  const store = new BatchedRedisStore(c, prefix)
  const window = 2_000

  const [first] = hitsOf(t, [await incr(store, 'w', window)])
  t.equal(first?.current, 1)
  t.ok(first !== undefined && first.ttl > 0 && first.ttl <= window, `first returned ttl in (0, ${window}] (${first?.ttl})`)
  const pttl1 = await c.pttl(`${prefix}w`)
  t.ok(pttl1 > 0 && pttl1 <= window, `first hit set a TTL in (0, ${window}] (${pttl1})`)

  // time-based by nature: the remaining TTL must have visibly shrunk
  await sleep(50)
  const [second] = hitsOf(t, [await incr(store, 'w', window)])
  t.equal(second?.current, 2)
  t.ok(second !== undefined && second.ttl > 0 && second.ttl <= window, `second returned ttl in (0, ${window}] (${second?.ttl})`)
  t.ok(second !== undefined && first !== undefined && second.ttl < first.ttl, 'the window is not restarted by later hits')

  // a key that exists without a TTL (a lost PEXPIRE) is repaired instead of counting forever
  await c.set(`${prefix}no-ttl`, '5')
  t.equal(await c.pttl(`${prefix}no-ttl`), -1, 'set up: no TTL')
  const [repaired] = hitsOf(t, [await incr(store, 'no-ttl', window)])
  t.equal(repaired?.current, 6, 'counting continues')
  t.ok(repaired !== undefined && repaired.ttl > 0 && repaired.ttl <= window, `returned ttl in (0, ${window}] (${repaired?.ttl})`)
  const pttl2 = await c.pttl(`${prefix}no-ttl`)
  t.ok(pttl2 > 0 && pttl2 <= window, `the key has a TTL again (${pttl2})`)

  // a short window elapses: the count starts again from 1
  const short = 200
  hitsOf(t, [await incr(store, 'short', short), await incr(store, 'short', short)])
  // time-based by nature: the window elapses
  await sleep(short + 100)
  const [fresh] = hitsOf(t, [await incr(store, 'short', short)])
  t.equal(fresh?.current, 1, 'after the window the count restarts')
  t.ok(fresh !== undefined && fresh.ttl > 0 && fresh.ttl <= short)
})

t.test('a key INCR cannot count fails alone: the other increments of its batch are answered', async (t) => {
  const c = await client(t, shared)
  const prefix = freshPrefix(t, c)
  const store = new BatchedRedisStore(c, prefix)
  await c.set(`${prefix}bad`, 'not-a-number')
  // one event-loop turn: all three share one script call
  const [a, bad, b] = await Promise.all([incr(store, 'a'), incr(store, 'bad'), incr(store, 'b')])
  t.ok(bad?.err instanceof Error, 'the uncountable key gets an Error')
  t.match(bad?.err?.message ?? '', /cannot count/)
  t.equal(a?.hits?.current, 1, 'the key before it is counted')
  t.equal(b?.hits?.current, 1, 'the key after it is counted')
  t.equal(await c.get(`${prefix}bad`), 'not-a-number', 'the bad key is left alone')
})

// --- (d) SCRIPT FLUSH --------------------------------------------------------------------------------------------------

t.test('SCRIPT FLUSH: the NOSCRIPT fallback answers correctly, then EVALSHA is used again', async (t) => {
  const server = await privateRedis(t)
  const c = await client(t, server.url)
  const admin = await client(t, server.url)
  const store = new BatchedRedisStore(c, 'flush:')

  hitsOf(t, [await incr(store, 'a')]) // script cached
  await admin.script('FLUSH')

  const before = await commandStats(admin)
  const batch = hitsOf(t, await within(Promise.all(Array.from({ length: 10 }, () => incr(store, 'a'))), 5_000, 'batch after SCRIPT FLUSH'))
  const mid = await commandStats(admin)
  t.same(batch.map((h) => h.current).sort((x, y) => x - y), [2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 'the batch after the flush counted exactly')
  const sha1 = delta(before, mid, 'evalsha')
  t.equal(attempts(sha1), 1, 'one EVALSHA ...')
  t.equal(sha1.failed + sha1.rejected, 1, '... refused with NOSCRIPT')
  t.equal(attempts(delta(before, mid, 'eval')), 1, 'one EVAL fallback for the whole batch')

  const next = hitsOf(t, await Promise.all(Array.from({ length: 5 }, () => incr(store, 'a'))))
  const after = await commandStats(admin)
  t.same(next.map((h) => h.current).sort((x, y) => x - y), [12, 13, 14, 15, 16])
  t.same(delta(mid, after, 'evalsha'), { calls: 1, rejected: 0, failed: 0 }, 'the EVAL re-cached the script: EVALSHA succeeds again')
  t.equal(attempts(delta(mid, after, 'eval')), 0)
  t.equal(await c.get('flush:a'), '16')
})

// --- (e) errors --------------------------------------------------------------------------------------------------------

function assertAllFailed (tt: Test, outcomes: Outcome[], n: number): void {
  tt.equal(outcomes.length, n)
  const errors = outcomes.filter((o) => o.err instanceof Error)
  tt.equal(errors.length, n, 'every callback received an Error')
  tt.equal(outcomes.filter((o) => o.hits !== undefined).length, 0, 'none received hits')
}

t.test('errors: every callback of every batch gets an Error, none hangs', async (t) => {
  await t.test('unreachable server (closed port, no offline queue)', async (tt) => {
    const port = await freePort() // nothing listens on it
    const dead = new Redis({ host: '127.0.0.1', port, lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 0, retryStrategy: () => null })
    dead.on('error', () => {})
    tt.teardown(() => { dead.disconnect() })
    const store = new BatchedRedisStore(dead, 'dead:')
    const n = MAX_BATCH + 44 // two batches: one sent at MAX_BATCH, the rest at the end of the turn
    const started = Date.now()
    const outcomes = await within(Promise.all(Array.from({ length: n }, (_, i) => incr(store, `k${i % 7}`))), 3_000, 'callbacks answered')
    assertAllFailed(tt, outcomes, n)
    tt.ok(Date.now() - started < 3_000, `answered in ${Date.now() - started} ms`)
  })

  await t.test('frozen server (SIGSTOP) with a command timeout, then back', async (tt) => {
    const server = await privateRedis(tt)
    const c = new Redis(server.url, { lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 1, commandTimeout: 300 })
    c.on('error', () => {})
    await c.connect()
    tt.teardown(() => { c.disconnect() })
    const store = new BatchedRedisStore(c, 'frozen:')
    hitsOf(tt, [await incr(store, 'x')]) // connected, script cached

    process.kill(server.process.pid ?? 0, 'SIGSTOP')
    const n = MAX_BATCH + 10
    const started = Date.now()
    const outcomes = await within(Promise.all(Array.from({ length: n }, () => incr(store, 'x'))), 3_000, 'callbacks answered while Redis is frozen')
    const ms = Date.now() - started
    assertAllFailed(tt, outcomes, n)
    tt.ok(outcomes.every((o) => /timed out/i.test(o.err?.message ?? '')), 'the errors are command timeouts')
    tt.ok(ms < 2_000, `answered in ${ms} ms`)

    process.kill(server.process.pid ?? 0, 'SIGCONT')
    // the increments written before the freeze run once Redis wakes up; the store answers again
    const [after] = hitsOf(tt, [await within(incr(store, 'x'), 3_000, 'increment after SIGCONT')])
    tt.ok(after !== undefined && after.current >= 2, `counting resumed (current ${after?.current})`)
  })
})
