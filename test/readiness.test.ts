// Readiness rules (issue 11 items 1 and 2), against real redis-servers of this test's own (no mocks):
//   - RATE_LIMIT_ON_STORE_ERROR=open: a Redis outage (down from the start, or stopped while serving) is reported
//     (redis check detail `degraded: ...`, resonance_rate_limit_store_degraded 1 without any traffic, one log line)
//     but /readyz stays 200 and requests are served; it turns back when Redis returns;
//   - RATE_LIMIT_ON_STORE_ERROR=closed: the same outage makes /readyz 503 (requests get 503 too);
//   - the JWKS never loaded, and draining, still fail readiness whatever the policy;
//   - /readyz never answers 200 before the revocations stored in Redis are loaded: polled from the moment the admin
//     port listens, the first 200 is followed at once by revoked tokens, which must all be refused;
//   - the revocation check itself waits for a load that a frozen (SIGSTOP) Redis holds up, and passes once it ran.
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import { Redis } from 'ioredis'
import pino from 'pino'
import { startIssuer } from './helpers/issuer.js'
import { getAs, readyz, startBackends, startGateway, untilReady, type Readyz, type TestGateway } from './helpers/gateway.js'
import { freePort } from './helpers/ports.js'
import { keyPrefix, ownRedis } from './helpers/redis.js'
import { audits, claims, metric, until } from './helpers/wait.js'
import { Revocations } from '../src/auth/revocation.js'
import { Readiness } from '../src/admin/readiness.js'
import { connectRedis, createRedis } from '../src/limits/redis.js'

const STORE_UNAVAILABLE = 'rate-limit store unavailable'
const STORE_BACK = 'rate-limit store available again'

const { issuer, upstream } = await startBackends(t)
const lines = (g: TestGateway, prefix: string): number => g.logs().filter((l) => typeof l.msg === 'string' && l.msg.startsWith(prefix)).length

function gatewayEnv (redisUrl: string, policy: 'open' | 'closed'): Record<string, string> {
  return { REDIS_URL: redisUrl, RATE_LIMIT_ON_STORE_ERROR: policy, RATE_LIMIT_KEY_PREFIX: keyPrefix() }
}

// --- item 1: a Redis outage and the policy --------------------------------------------------------------------------------

t.test('Redis down from the start, policy open: ready (degraded), gauge 1 without traffic, requests served', async (t) => {
  const port = await freePort() // nothing listens there
  const g = await startGateway(t, issuer, upstream, { env: gatewayEnv(`redis://127.0.0.1:${port}/0`, 'open') })
  await until(async () => (await readyz(g)).body.checks.redis?.detail?.startsWith('degraded') === true, 5_000, 'the redis check reports the outage')
  const r = await readyz(g)
  t.equal(r.status, 200, '/readyz 200: with `open` the site keeps serving, so the replica stays in the Service')
  t.match(r.body, { status: 'ready', checks: { jwks: { ok: true }, draining: { ok: true } } })
  t.match(r.body.checks.redis, { ok: true, detail: /^degraded: redis \w+.*limits per process/ }, `redis: ${String(r.body.checks.redis?.detail)}`)
  t.match(r.body.checks.revocations, { ok: true, detail: /^degraded: not loaded.*as soon as Redis answers/ }, `revocations: ${String(r.body.checks.revocations?.detail)}`)
  t.equal(await metric(g, 'resonance_rate_limit_store_degraded'), 1, 'resonance_rate_limit_store_degraded 1 before any request')
  t.equal(lines(g, STORE_UNAVAILABLE), 1, 'one log line for the outage')
  t.match(g.logs().find((l) => typeof l.msg === 'string' && l.msg.startsWith(STORE_UNAVAILABLE)), { level: 50, component: 'rate-limit', policy: 'open' })
  const token = await issuer.token({ sub: `open-${randomUUID().slice(0, 8)}` })
  for (let i = 0; i < 3; i++) t.equal((await getAs(g, token)).status, 200, `request ${i + 1} served (per-process limits)`)
  t.equal((await readyz(g)).status, 200, 'still ready after traffic')
  t.equal(lines(g, STORE_UNAVAILABLE), 1, 'still one log line')
})

t.test('Redis down from the start, policy closed: not ready, requests refused', async (t) => {
  const port = await freePort()
  const g = await startGateway(t, issuer, upstream, { env: gatewayEnv(`redis://127.0.0.1:${port}/0`, 'closed') })
  await until(async () => (await readyz(g)).body.checks.redis?.detail?.includes('closed') === true, 5_000, 'the redis check reports the outage')
  const r = await readyz(g)
  t.equal(r.status, 503, '/readyz 503: with `closed` every request would get 503')
  t.match(r.body, { status: 'not_ready', checks: { jwks: { ok: true }, redis: { ok: false }, revocations: { ok: false } } })
  t.match(r.body.checks.redis?.detail, /redis \w+.*RATE_LIMIT_ON_STORE_ERROR=closed/, `redis: ${String(r.body.checks.redis?.detail)}`)
  t.equal(await metric(g, 'resonance_rate_limit_store_degraded'), 1, 'gauge 1')
  t.equal((await getAs(g, await issuer.token({ sub: `closed-${randomUUID().slice(0, 8)}` }))).status, 503, 'requests get 503')
})

t.test('Redis stopped while serving, policy open: /readyz stays 200, the outage is reported, and ends', async (t) => {
  const server = await ownRedis(t)
  const g = await startGateway(t, issuer, upstream, { env: gatewayEnv(server.url, 'open') })
  await untilReady(g, 5_000, 'ready with Redis up')
  const up = await readyz(g)
  t.match(up.body.checks, { redis: { ok: true }, revocations: { ok: true } })
  t.notMatch(up.body.checks.redis?.detail ?? '', /degraded/)
  t.equal(await metric(g, 'resonance_rate_limit_store_degraded'), 0)

  await server.stop()
  await until(async () => (await metric(g, 'resonance_rate_limit_store_degraded')) === 1, 5_000, 'the gauge turns 1 without any request')
  const down = await readyz(g)
  t.equal(down.status, 200, '/readyz stays 200 while Redis is down')
  t.match(down.body.checks.redis, { ok: true, detail: /^degraded: / }, `redis: ${String(down.body.checks.redis?.detail)}`)
  t.match(down.body.checks.revocations, { ok: true }, 'the revocations loaded at start stay in force')
  t.equal((await getAs(g, await issuer.token({ sub: `during-${randomUUID().slice(0, 8)}` }))).status, 200, 'requests served')
  t.equal(lines(g, STORE_UNAVAILABLE), 1, 'one log line for the outage')

  await ownRedis(t, server.port)
  await until(async () => {
    const r = await readyz(g)
    return r.status === 200 && r.body.checks.redis?.ok === true && !(r.body.checks.redis.detail ?? '').includes('degraded')
  }, 10_000, 'the redis check is clean again')
  t.equal(await metric(g, 'resonance_rate_limit_store_degraded'), 0, 'gauge back to 0')
  t.equal(lines(g, STORE_BACK), 1, 'one recovery line')
})

t.test('Redis stopped while serving, policy closed: /readyz 503 until it is back', async (t) => {
  const server = await ownRedis(t)
  const g = await startGateway(t, issuer, upstream, { env: gatewayEnv(server.url, 'closed') })
  await untilReady(g, 5_000, 'ready with Redis up')
  await server.stop()
  await until(async () => (await readyz(g)).status === 503, 5_000, '/readyz 503 while Redis is down')
  t.match((await readyz(g)).body.checks, { redis: { ok: false }, revocations: { ok: true } }, 'the redis check fails; revocations stay loaded')
  await ownRedis(t, server.port)
  await untilReady(g, 10_000, '/readyz 200 once Redis is back')
  t.match((await readyz(g)).body.checks, { redis: { ok: true }, revocations: { ok: true } }, 'ready again: the redis check passes, revocations still loaded')
})

t.test('policy open never hides a JWKS that has not loaded, nor draining', async (t) => {
  const port = await freePort()
  const dead = await startIssuer()
  t.teardown(() => dead.close())
  dead.setJwksMode('unavailable')
  const g = await startGateway(t, dead, upstream, { env: { ...gatewayEnv(`redis://127.0.0.1:${port}/0`, 'open'), JWKS_MIN_REFRESH_INTERVAL: '5s' } })
  await until(async () => (await readyz(g)).body.checks.redis?.detail?.startsWith('degraded') === true, 5_000, 'redis reported degraded')
  const r = await readyz(g)
  t.equal(r.status, 503, 'not ready: no key set yet')
  t.match(r.body.checks, { jwks: { ok: false, detail: /openid-configuration/ }, redis: { ok: true } })

  const ok = await startGateway(t, issuer, upstream, { env: gatewayEnv(`redis://127.0.0.1:${port}/0`, 'open') })
  await untilReady(ok, 5_000, 'ready (degraded)')
  ok.gw.readiness.draining = true
  const draining = await readyz(ok)
  t.equal(draining.status, 503, 'draining: 503 whatever the store policy')
  t.match(draining.body.checks, { draining: { ok: false } })
  ok.gw.readiness.draining = false
})

// --- item 2: not ready before the revocations are loaded ----------------------------------------------------------------------

t.test('/readyz is never 200 before the revocations in Redis are loaded', async (t) => {
  const server = await ownRedis(t)
  const prefix = keyPrefix()
  const rc = new Redis(server.url, { lazyConnect: true })
  await rc.connect()
  t.teardown(() => rc.disconnect())
  // A realistic set: many revocations (other users' tokens), among them those of the tokens presented below.
  const FILLER = 30_000
  const at = String(Math.floor(Date.now() / 1000))
  for (let start = 0; start < FILLER; start += 5_000) {
    const p = rc.pipeline()
    for (let i = start; i < Math.min(FILLER, start + 5_000); i++) p.set(`${prefix}rev:jti:${randomUUID()}`, at, 'PX', 600_000)
    await p.exec()
  }
  const revoked = await Promise.all(Array.from({ length: 20 }, (_, i) => issuer.token({ sub: `revoked-${i}-${randomUUID().slice(0, 8)}` })))
  const p = rc.pipeline()
  for (const tok of revoked) p.set(`${prefix}rev:jti:${claims(tok).jti}`, at, 'PX', 600_000)
  await p.exec()
  const fine = await issuer.token({ sub: `fine-${randomUUID().slice(0, 8)}` })

  // As server.ts does: the listeners are up while start() (JWKS, Redis, revocations) is still running.
  const g = await startGateway(t, issuer, upstream, { env: { REDIS_URL: server.url, RATE_LIMIT_KEY_PREFIX: prefix }, noStart: true })
  const starting = g.gw.start()
  let polls = 0
  let first: Readyz | undefined
  const deadline = Date.now() + 20_000
  while (Date.now() < deadline) {
    polls++
    const r = await readyz(g)
    if (r.status === 200) { first = r; break }
  }
  t.ok(first !== undefined, `/readyz turned 200 (after ${polls} polls)`)
  // At once, before anything else can load: every revoked token must be refused.
  const statuses = await Promise.all(revoked.map(async (tok) => (await getAs(g, tok)).status))
  t.same(statuses, revoked.map(() => 401), `all ${revoked.length} revoked tokens refused at the first 200: ${JSON.stringify(statuses)}`)
  await starting
  t.equal(g.gw.revocations.size, FILLER + revoked.length, 'the whole set is loaded')
  t.match(first?.body.checks.revocations, { ok: true }, `revocations check: ${String(first?.body.checks.revocations?.detail)}`)
  t.equal(audits(g, { reason: 'revoked' }).length, revoked.length, 'audited as revoked')
  t.equal((await getAs(g, fine)).status, 200, 'a token that is not revoked is served')
})

t.test('the revocation check waits for a load that a frozen Redis holds up', async (t) => {
  const server = await ownRedis(t)
  const prefix = keyPrefix()
  const rc = new Redis(server.url, { lazyConnect: true })
  await rc.connect()
  t.teardown(() => rc.disconnect())
  await rc.set(`${prefix}rev:sub:frozen-user`, String(Math.floor(Date.now() / 1000)), 'PX', 600_000)

  const log = pino({ level: 'silent' })
  const redis = createRedis({ url: server.url, clusterNodes: [] }, log)
  if (redis === undefined) throw new Error('no redis client')
  t.teardown(() => redis.disconnect())
  await connectRedis(redis)
  const revocations = new Revocations({ redis, keyPrefix: prefix, minTtlMs: 60_000, clockToleranceSec: 0, log })
  t.teardown(() => revocations.close())
  const readiness = new Readiness()
  readiness.add('revocations', () => revocations.check('open'))

  server.process.kill('SIGSTOP')
  let thawed = false
  t.teardown(() => { if (!thawed) server.process.kill('SIGCONT') })
  const started = revocations.start().catch(() => {})
  const id = { sub: 'frozen-user', iat: Math.floor(Date.now() / 1000) - 10 } as never
  // Redis is connected (not known down) but does not answer: the load cannot finish, so not ready, under `open` too.
  const frozenUntil = Date.now() + 1_500
  let evaluations = 0
  // time-based by nature ("never ready during 1.5 s"): evaluated every 100 ms over the window
  while (Date.now() < frozenUntil) {
    const r = await readiness.evaluate()
    evaluations++
    t.equal(r.ready, false, `not ready while the load is held up (${JSON.stringify(r.checks.revocations)})`)
    if (!t.passing()) break
    await sleep(100)
  }
  t.ok(evaluations >= 5, `evaluated ${evaluations} times while frozen`)
  t.equal(revocations.isRevoked(id), false, '(the revocation is indeed not loaded yet)')

  server.process.kill('SIGCONT')
  thawed = true
  await until(async () => (await readiness.evaluate()).ready, 5_000, 'ready once the load has run')
  t.equal(revocations.isRevoked(id), true, 'and the revocation is in force the moment it is ready')
  await started
})
