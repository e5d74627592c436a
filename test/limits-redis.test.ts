// Rate limits across processes and through Redis failures, against real redis-servers (no mocks):
//   - two `node dist/server.js` processes on one Redis with one prefix enforce exactly one budget;
//   - REDIS_URL with a password and a db number;
//   - our OWN redis-server killed (SIGKILL) and restarted on the same port mid-test, policy `open` with
//     RATE_LIMIT_FALLBACK_MAX: answers within the timeout, fallback limit enforced, /readyz 200 with a degraded redis detail,
//     the outage logged once, the store-error metric, limits shared again after the restart;
//   - a frozen (SIGSTOP) Redis: slow, not down; requests still answer within the timeout;
//   - policy `closed`: 503 + Retry-After while Redis is down, served again after it is back.
// The shared Redis on 6379 is never killed; every test uses its own key prefix and deletes only its keys.
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { Redis } from 'ioredis'
import { randomSub } from './helpers/issuer.js'
import { baseEnv, readyz, startBackends, startGateway, untilReady, type TestGateway } from './helpers/gateway.js'
import { ensureBuilt, spawnGateway } from './helpers/process.js'
import { deleteKeys, keyPrefix, ownRedis, redisCli, redisUrl, scanKeys } from './helpers/redis.js'
import { scrapeMetric, until } from './helpers/wait.js'

/** Every request while Redis is dead, frozen or restarting must be answered within this. */
const ANSWER_WITHIN_MS = 1500
const STORE_UNAVAILABLE = 'rate-limit store unavailable'
const STORE_BACK = 'rate-limit store available again'

ensureBuilt()
const { issuer, upstream } = await startBackends(t)

// --- helpers -----------------------------------------------------------------------------------------------------------

interface Answer { status: number, headers: Record<string, string>, body: string, ms: number }

async function request (base: string, path: string, token: string, timeoutMs = 10_000): Promise<Answer> {
  const started = performance.now()
  const res = await fetch(base + path, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(timeoutMs) })
  const body = await res.text()
  return { status: res.status, headers: Object.fromEntries(res.headers), body, ms: performance.now() - started }
}

/** The redis check passes and says nothing of an outage: the gateway is on Redis again. */
async function redisClean (g: { adminUrl: string }): Promise<boolean> {
  const c = (await readyz(g, ANSWER_WITHIN_MS)).body.checks.redis
  return c?.ok === true && !String(c.detail).startsWith('degraded')
}

function median (xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  const mid = Math.floor(s.length / 2)
  return s.length % 2 === 1 ? s[mid] as number : ((s[mid - 1] as number) + (s[mid] as number)) / 2
}

function client (url: string): Redis {
  return new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, enableOfflineQueue: false, retryStrategy: () => null })
}

/** An in-process gateway on `redis` with a fresh prefix; asserts it is ready (JWKS + Redis) before returning. */
async function gateway (tt: Test, redisEnv: Record<string, string>, env: Record<string, string>, prefix = keyPrefix()): Promise<TestGateway & { prefix: string }> {
  const g = await startGateway(tt, issuer, upstream, { env: { RATE_LIMIT_KEY_PREFIX: prefix, ...redisEnv, ...env } })
  await untilReady(g)
  return Object.assign(g, { prefix })
}

/**
 * Recovery under steady traffic, as production has it: a request every ~50 ms until `done()` or `ms` elapsed.
 * Returns whether it recovered.
 */
async function recoveredUnderTraffic (send: () => Promise<unknown>, done: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    await send()
    if (await done()) return true
    await sleep(50) // time-based by nature: the traffic's pace
  }
  return false
}

/** Recovery when requests come less often than the 1 s breaker interval. */
async function recoveredAfterQuiet (send: () => Promise<unknown>, done: () => boolean | Promise<boolean>, tries = 5): Promise<boolean> {
  for (let i = 0; i < tries; i++) {
    // time-based by nature: longer than the 1 s breaker interval
    await sleep(1100)
    await send()
    if (await done()) return true
  }
  return false
}

/** Asserts recovery under steady traffic; when that fails (a bug), checks and documents the quiet-interval recovery so the rest of the test still runs. */
async function assertRecovers (tt: Test, what: string, send: () => Promise<unknown>, done: () => boolean | Promise<boolean>): Promise<void> {
  const started = Date.now()
  const underTraffic = await recoveredUnderTraffic(send, done, 5000)
  tt.ok(underTraffic, `${what}: back to Redis by itself under steady traffic (a request every 50 ms), within 5 s`)
  if (underTraffic) {
    tt.comment(`${what}: recovered ${Date.now() - started} ms after Redis was back`)
    return
  }
  const quiet = await recoveredAfterQuiet(send, done)
  tt.comment(`${what}: did NOT recover under steady traffic; after a quiet >1 s gap: ${quiet ? 'recovered' : 'still not recovered'}`)
  tt.ok(quiet, `${what}: recovers at least once requests pause for longer than the breaker interval`)
}

const msgs = (g: TestGateway, text: string): number => g.logs().filter((l) => typeof l.msg === 'string' && l.msg.startsWith(text)).length

// --- two gateway processes, one Redis, one budget -----------------------------------------------------------------------

/** `node dist/server.js` between this file's issuer and app, once it listens. */
async function gatewayProcess (tt: Test, env: Record<string, string>): Promise<{ url: string, adminUrl: string, stdout: () => string }> {
  const p = spawnGateway(tt, { ...baseEnv(issuer, upstream), ...env })
  return { ...await p.listening(), stdout: p.stdout }
}

t.test('two gateway processes on one Redis enforce exactly one budget', async (t) => {
  const url = await redisUrl()
  const prefix = keyPrefix()
  const admin = client(url)
  await admin.connect()
  t.teardown(async () => { await deleteKeys(admin, prefix); admin.disconnect() })

  const MAX = 20
  const env = { REDIS_URL: url, RATE_LIMIT_KEY_PREFIX: prefix, RATE_LIMIT_MAX: String(MAX), RATE_LIMIT_WINDOW: '60s', LOG_LEVEL: 'info' }
  const [a, b] = await Promise.all([gatewayProcess(t, env), gatewayProcess(t, env)])
  await Promise.all([untilReady(a, 10_000, 'process a ready (JWKS + Redis)'), untilReady(b, 10_000, 'process b ready (JWKS + Redis)')])

  const sub = randomSub('two-procs')
  const [token, warm] = await Promise.all([issuer.token({ sub }), issuer.token({ sub: randomSub('warm-up') })])
  // warm both processes up (JIT, connection pools) so a cold event loop does not stall past the 500 ms Redis command
  // timeout, which would (correctly) switch that process to its fallback budget and blur the measurement
  for (const p of [a, b]) await Promise.all(Array.from({ length: 30 }, () => request(p.url, '/api/warm', warm)))
  const path = `/api/${randomSub('hammer')}`
  const PER_PROCESS = 30
  const answers = await Promise.all(Array.from({ length: PER_PROCESS * 2 }, (_, i) =>
    request(i % 2 === 0 ? a.url : b.url, `${path}?i=${i}`, token).then((r) => ({ ...r, proc: i % 2 === 0 ? 'a' : 'b' }))))
  const ok = answers.filter((r) => r.status === 200)
  const limited = answers.filter((r) => r.status === 429)
  t.comment(`200s: ${ok.length} (a ${ok.filter((r) => r.proc === 'a').length}, b ${ok.filter((r) => r.proc === 'b').length}); 429s: ${limited.length}`)
  t.equal(ok.length, MAX, `the sum of 200s across both processes is exactly RATE_LIMIT_MAX (${MAX})`)
  t.equal(limited.length, PER_PROCESS * 2 - MAX, 'every other request got 429')
  t.equal(upstream.requests.filter((r) => r.url.startsWith(path)).length, MAX, 'the app saw exactly the allowed requests')
  const keys = await scanKeys(admin, prefix)
  const userKey = keys.find((k) => k.includes(sub))
  t.ok(userKey?.startsWith(prefix), `one shared counter under the prefix: ${String(userKey)}`)
  t.equal(await admin.get(userKey as string), String(PER_PROCESS * 2), 'which counted every request of both processes')
  const storeErrors = await scrapeMetric(a.adminUrl, 'resonance_rate_limit_store_errors_total') + await scrapeMetric(b.adminUrl, 'resonance_rate_limit_store_errors_total')
  t.equal(storeErrors, 0, 'no store errors on the way (otherwise a process used its fallback budget: see the counts above)')
  t.notOk(a.stdout().includes(STORE_UNAVAILABLE) || b.stdout().includes(STORE_UNAVAILABLE), 'no store-unavailable log line')
})

t.test('REDIS_URL with a password and a db number', async (t) => {
  const server = await ownRedis(t)
  // set after start: startRedisServer's readiness PING needs an open server
  await redisCli(['-p', String(server.port), 'CONFIG', 'SET', 'requirepass', 's3cret-pw'])
  const url = `redis://:s3cret-pw@127.0.0.1:${server.port}/5`
  const g = await gateway(t, { REDIS_URL: url }, { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '10s' })
  const sub = randomSub('pw')
  const token = await issuer.token({ sub })
  for (const expected of [200, 200, 429]) t.equal((await request(g.url, '/api/pw', token)).status, expected)
  const db5 = client(url)
  await db5.connect()
  t.teardown(() => db5.disconnect())
  t.ok((await scanKeys(db5, g.prefix)).some((k) => k.includes(sub)), 'the counter lives in db 5')
  t.same(await db5.select(0).then(() => scanKeys(db5, g.prefix)), [], 'and not in db 0')
  t.notOk(g.rawLogs.some((l) => l.includes('s3cret-pw')), 'the password is never logged')

  const wrong = await startGateway(t, issuer, upstream, {
    env: { REDIS_URL: `redis://:wrong@127.0.0.1:${server.port}/5`, RATE_LIMIT_KEY_PREFIX: g.prefix, RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '10s' }
  })
  const r = await readyz(wrong, ANSWER_WITHIN_MS)
  // policy open (default): still ready, the redis check names the problem
  t.equal(r.status, 200, 'policy open: a wrong password keeps the replica ready')
  t.match(r.body.checks.redis, { ok: true, detail: /^degraded: .*WRONGPASS/ }, `and shows in /readyz: ${String(r.body.checks.redis?.detail)}`)
  const a = await request(wrong.url, '/api/pw', await issuer.token({ sub: randomSub('pw2') }))
  t.equal(a.status, 200, 'and requests are still answered (fallback)')
  t.ok(a.ms < ANSWER_WITHIN_MS, `within ${ANSWER_WITHIN_MS} ms (${a.ms.toFixed(0)} ms)`)
  t.notOk(wrong.rawLogs.some((l) => l.includes('wrong@')), 'no credentials in logs')
})

t.test('Redis killed and restarted (policy open + RATE_LIMIT_FALLBACK_MAX)', async (t) => {
  const server = await ownRedis(t)
  const port = server.port
  const MAX = 6
  const FALLBACK = 3
  const env = { RATE_LIMIT_ON_STORE_ERROR: 'open', RATE_LIMIT_FALLBACK_MAX: String(FALLBACK), RATE_LIMIT_MAX: String(MAX), RATE_LIMIT_WINDOW: '30s' }
  const g = await gateway(t, { REDIS_URL: server.url }, env)
  const g2 = await gateway(t, { REDIS_URL: server.url }, env, g.prefix)
  const subs = Array.from({ length: 24 }, (_, i) => randomSub(`u${i}`))
  const tokens = await Promise.all(subs.map((sub) => issuer.token({ sub })))
  const tok = (i: number): string => tokens[i] as string
  const statuses = async (base: string, token: string, n: number): Promise<Answer[]> => {
    const out: Answer[] = []
    for (let i = 0; i < n; i++) out.push(await request(base, '/api/outage', token))
    return out
  }

  // Redis up: the normal, shared budget
  const before = await statuses(g.url, tok(0), MAX + 1)
  t.same(before.map((a) => a.status), [...Array(MAX).fill(200), 429], 'Redis up: normal budget')
  const storeErrorsBefore = await scrapeMetric(g.adminUrl, 'resonance_rate_limit_store_errors_total')
  t.equal(storeErrorsBefore, 0, 'no store errors while Redis is up')

  // --- kill -9 ----------------------------------------------------------------------------------------------------------
  await server.kill()
  const killedAt = Date.now()

  const during = await statuses(g.url, tok(1), FALLBACK + 2)
  t.same(during.map((a) => a.status), [...Array(FALLBACK).fill(200), 429, 429], `Redis dead: per-process fallback limit (${FALLBACK}) enforced`)
  for (const [i, a] of during.entries()) t.ok(a.ms < ANSWER_WITHIN_MS, `request ${i + 1} while Redis is dead answered in ${a.ms.toFixed(0)} ms`)
  const last = during[during.length - 1] as Answer
  t.ok(Number(last.headers['retry-after']) >= 1, 'fallback 429 carries Retry-After')
  t.ok(last.headers['x-ratelimit-limit'] !== undefined && last.headers['x-ratelimit-remaining'] === '0', 'and the rate-limit headers')
  t.same((await statuses(g2.url, tok(1), FALLBACK + 1)).map((a) => a.status), [...Array(FALLBACK).fill(200), 429], 'the other replica has its own fallback budget (per process)')

  // latency while Redis is down: one request each for 20 users (allowed, so proxied), spread over > 1 breaker interval
  const latencies: number[] = []
  for (let i = 0; i < 20; i++) {
    const a = await request(g.url, '/api/outage', tok(4 + i))
    t.equal(a.status, 200, `user ${i + 4} served from the fallback`)
    latencies.push(a.ms)
    if (i === 9) await sleep(1200) // past the 1 s breaker: Redis is retried
  }
  const med = median(latencies)
  t.comment(`latency while Redis is down: median ${med.toFixed(1)} ms, max ${Math.max(...latencies).toFixed(1)} ms over ${latencies.length} requests`)
  t.ok(Math.max(...latencies) < ANSWER_WITHIN_MS, `every request within ${ANSWER_WITHIN_MS} ms`)

  const r = await readyz(g, ANSWER_WITHIN_MS)
  t.equal(r.status, 200, '/readyz stays 200 while Redis is down (policy open: the site keeps serving)')
  t.equal(r.body.checks.redis?.ok, true, 'with a passing redis check')
  t.match(r.body.checks.redis?.detail, /^degraded: .*(redis|connect|ECONNREFUSED|closed)/i, `that reports the outage: ${String(r.body.checks.redis?.detail)}`)
  t.ok(await scrapeMetric(g.adminUrl, 'resonance_rate_limit_store_errors_total') > 0, 'resonance_rate_limit_store_errors_total > 0')
  t.equal(await scrapeMetric(g.adminUrl, 'resonance_rate_limit_store_degraded'), 1, 'resonance_rate_limit_store_degraded 1')
  t.equal(msgs(g, STORE_UNAVAILABLE), 1, `exactly one '${STORE_UNAVAILABLE}' line for the outage (${latencies.length + during.length} requests)`)
  t.match(g.logs().find((l) => typeof l.msg === 'string' && l.msg.startsWith(STORE_UNAVAILABLE)), { level: 50, component: 'rate-limit', policy: 'open' })
  t.ok(Date.now() - killedAt > 1200, 'the outage spanned more than one breaker interval')

  // --- restart on the same port -----------------------------------------------------------------------------------------
  const restarted = await ownRedis(t, port)
  const fresh = client(restarted.url)
  await fresh.connect()
  t.teardown(() => fresh.disconnect())
  const back = Date.now()
  const probe = randomSub('probe')
  const probeToken = await issuer.token({ sub: probe })
  await assertRecovers(t, 'after kill + restart', () => request(g.url, '/api/outage', probeToken),
    async () => (await scanKeys(fresh, g.prefix)).some((k) => k.includes(probe)))
  t.comment(`a counter appeared in the restarted Redis ${Date.now() - back} ms after the restart`)
  await until(async () => await redisClean(g), 5000, 'redis check clean again', 50)
  t.equal(msgs(g, STORE_BACK), 1, `one '${STORE_BACK}' line`)
  t.equal(await scrapeMetric(g.adminUrl, 'resonance_rate_limit_store_degraded'), 0, 'degraded gauge back to 0')
  t.equal(msgs(g, STORE_UNAVAILABLE), 1, 'still exactly one outage line')

  // both replicas back on the shared budget: the sum over both is exactly MAX again
  await until(async () => await redisClean(g2), 5000, 'replica 2 on Redis again', 50)
  const shared = randomSub('shared')
  const sharedToken = await issuer.token({ sub: shared })
  let okCount = 0
  for (let i = 0; i < MAX * 2; i++) if ((await request(i % 2 === 0 ? g.url : g2.url, '/api/outage', sharedToken)).status === 200) okCount++
  t.equal(okCount, MAX, `after the restart both replicas share one budget again (${okCount} of ${MAX * 2} allowed)`)
  const replayed = (await scanKeys(fresh, g.prefix)).filter((k) => subs.slice(1).some((sub) => k.includes(sub)))
  t.same(replayed, [], 'nothing counted during the outage was replayed into the restarted Redis (no offline queue)')
  const sharedKey = (await scanKeys(fresh, g.prefix)).find((k) => k.includes(shared))
  t.equal(await fresh.get(sharedKey as string), String(MAX * 2), 'counted in the restarted Redis')
})

t.test('a frozen Redis (SIGSTOP: slow, not down) never hangs requests', async (t) => {
  const server = await ownRedis(t)
  const g = await gateway(t, { REDIS_URL: server.url }, { RATE_LIMIT_ON_STORE_ERROR: 'open', RATE_LIMIT_FALLBACK_MAX: '2', RATE_LIMIT_MAX: '5', RATE_LIMIT_WINDOW: '30s' })
  const token = await issuer.token({ sub: randomSub('frozen') })
  t.equal((await request(g.url, '/api/f', token)).status, 200, 'Redis answering')

  server.process.kill('SIGSTOP')
  t.teardown(() => { server.process.kill('SIGCONT') })
  const answers: Answer[] = []
  for (let i = 0; i < 4; i++) answers.push(await request(g.url, '/api/f', token))
  await sleep(1100) // the breaker expires: Redis is tried (and times out) again
  answers.push(await request(g.url, '/api/f', token))
  t.comment(`latency with a frozen Redis: ${answers.map((a) => a.ms.toFixed(0)).join(', ')} ms`)
  for (const [i, a] of answers.entries()) t.ok(a.ms < ANSWER_WITHIN_MS, `request ${i + 1} answered in ${a.ms.toFixed(0)} ms (command timeout, no hang)`)
  t.same(answers.map((a) => a.status), [200, 200, 429, 429, 429], 'fallback limit (2) while Redis does not answer')
  const r = await readyz(g, ANSWER_WITHIN_MS)
  t.equal(r.status, 200, '/readyz stays 200 (policy open)')
  t.match(r.body.checks.redis, { ok: true, detail: /^degraded: / }, `the PING timing out is reported: ${String(r.body.checks.redis?.detail)}`)
  t.equal(msgs(g, STORE_UNAVAILABLE), 1, 'logged once')

  server.process.kill('SIGCONT')
  await until(async () => await redisClean(g), 5000, 'redis check clean again after SIGCONT', 50)
  const other = await issuer.token({ sub: randomSub('thawed') })
  await assertRecovers(t, 'after SIGCONT', () => request(g.url, '/api/f', other), () => msgs(g, STORE_BACK) === 1)
  t.equal(msgs(g, STORE_BACK), 1, 'recovery logged once')
})

t.test('policy closed: 503 + Retry-After while Redis is down, served again when it is back', async (t) => {
  const server = await ownRedis(t)
  const port = server.port
  const g = await gateway(t, { REDIS_URL: server.url }, { RATE_LIMIT_ON_STORE_ERROR: 'closed', RATE_LIMIT_MAX: '50', RATE_LIMIT_WINDOW: '30s' })
  const token = await issuer.token({ sub: randomSub('closed') })
  t.equal((await request(g.url, '/api/c', token)).status, 200, 'Redis up: served')

  await server.kill()
  const path = `/api/${randomSub('closed')}`
  const answers: Answer[] = []
  for (let i = 0; i < 5; i++) answers.push(await request(g.url, path, token))
  for (const [i, a] of answers.entries()) {
    t.equal(a.status, 503, `request ${i + 1}: 503`)
    t.ok(a.ms < ANSWER_WITHIN_MS, `answered in ${a.ms.toFixed(0)} ms`)
    t.ok(Number(a.headers['retry-after']) >= 1, 'with Retry-After')
    t.match(a.headers['content-type'], /^application\/json/, 'and a JSON body')
    t.equal((JSON.parse(a.body) as { error?: string }).error, 'unavailable')
  }
  t.equal(upstream.requests.filter((r) => r.url.startsWith(path)).length, 0, 'nothing reached the app')
  const r = await readyz(g, ANSWER_WITHIN_MS)
  t.equal(r.status, 503, '/readyz 503 while Redis is down')
  t.equal(r.body.checks.redis?.ok, false, 'redis check failing')
  t.equal(msgs(g, STORE_UNAVAILABLE), 1, 'the outage logged once')
  t.match(g.logs().find((l) => typeof l.msg === 'string' && l.msg.startsWith(STORE_UNAVAILABLE)), { policy: 'closed' })
  t.ok(await scrapeMetric(g.adminUrl, 'resonance_rate_limit_store_errors_total') >= 5, 'store errors counted')

  await ownRedis(t, port)
  let last = 0
  await assertRecovers(t, 'policy closed, after restart', async () => { last = (await request(g.url, '/api/c', token)).status }, () => last === 200)
  t.equal(msgs(g, STORE_BACK), 1, 'recovery logged once')
})
