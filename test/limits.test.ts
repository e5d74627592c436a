// Per-user rate limits through real sockets against a real Redis (the shared one on 6379, DB 11, or a private
// redis-server): the limit and its headers on every response, 429 + Retry-After + JSON, the audit line and the metric,
// nothing 429'd reaches the app; users independent; the window resets; GET/POST/WebSocket upgrades share one budget;
// per-route rules (own budget, most specific wins), per-role budgets (premium), exempt subs and roles; the key prefix
// in Redis; public paths per client IP; the per-IP auth-failure limit (before token verification, honouring
// TRUST_PROXY); and the in-process store with its startup warning when no Redis is configured.
//
// Every gateway gets its own RATE_LIMIT_KEY_PREFIX (test:<uuid>:) and only those keys are deleted afterwards.
import { randomUUID } from 'node:crypto'
import t, { type Test } from 'tap'
import { randomSub } from './helpers/issuer.js'
import { startBackends, startGateway, untilReady, type LogLine, type TestGateway } from './helpers/gateway.js'
import { scanKeys, sharedRedis } from './helpers/redis.js'
import { scrapeMetric, until } from './helpers/wait.js'
import { upgrade, type WsOutcome } from './helpers/ws-client.js'

interface Answer { status: number, headers: Record<string, string>, body: string }

const { url, client: redis, freshPrefix } = await sharedRedis(t)
const { issuer, upstream } = await startBackends(t)

/** A gateway on the shared Redis with its own key prefix; its keys are deleted when the file ends. */
async function gateway (tt: Test, env: Record<string, string> = {}, yaml = '', withRedis = true): Promise<TestGateway & { prefix: string }> {
  const prefix = freshPrefix()
  const g = await startGateway(tt, issuer, upstream, {
    env: { RATE_LIMIT_KEY_PREFIX: prefix, ...(withRedis ? { REDIS_URL: url } : {}), ...env },
    yaml
  })
  if (withRedis) await untilReady(g, 5000, 'gateway ready (JWKS + Redis)')
  return Object.assign(g, { prefix })
}

async function request (g: TestGateway, path: string, opts: { token?: string, method?: string, headers?: Record<string, string>, body?: string } = {}): Promise<Answer> {
  const headers: Record<string, string> = { ...opts.headers }
  if (opts.token !== undefined) headers.authorization = `Bearer ${opts.token}`
  const res = await fetch(g.url + path, { method: opts.method ?? 'GET', headers, body: opts.body, signal: AbortSignal.timeout(5000) })
  return { status: res.status, headers: Object.fromEntries(res.headers), body: await res.text() }
}

async function statuses (g: TestGateway, path: string, token: string, n: number, extra: { method?: string, headers?: Record<string, string> } = {}): Promise<number[]> {
  const out: number[] = []
  for (let i = 0; i < n; i++) out.push((await request(g, path, { token, ...extra })).status)
  return out
}

/** Waits until the gateway's background failure counter for `ip` (in Redis, under `prefix`) reaches `n`. */
async function failuresCounted (prefix: string, ip: string, n: number): Promise<void> {
  await until(async () => {
    const key = (await scanKeys(redis, prefix)).find((k) => k.includes('fail') && k.endsWith(ip))
    return key !== undefined && Number(await redis.get(key)) >= n
  }, 2000, `${n} auth failures of ${ip} counted in Redis`)
}

/** An upgrade of `path` with `token` as bearer (5 s handshake timeout). */
const upgradeAs = (tt: Test, g: TestGateway, path: string, token: string, headers: Record<string, string> = {}): Promise<WsOutcome> =>
  upgrade(tt, g.wsUrl + path, { headers: { authorization: `Bearer ${token}`, ...headers }, handshakeTimeout: 5000 })

const triggered = (g: TestGateway, transport: 'http' | 'ws'): Promise<number> =>
  scrapeMetric(g.adminUrl, 'resonance_rate_limit_triggered_total', { transport })

const rateLimitAudits = (g: TestGateway, sub?: string): LogLine[] =>
  g.audits().filter((l) => l.event === 'rate_limited' && (sub === undefined || l.sub === sub))

function assertLimitHeaders (tt: Test, a: Answer, limit: number, remaining: number, windowS: number, what: string): void {
  tt.equal(a.headers['x-ratelimit-limit'], String(limit), `${what}: x-ratelimit-limit`)
  tt.equal(a.headers['x-ratelimit-remaining'], String(remaining), `${what}: x-ratelimit-remaining`)
  const reset = Number(a.headers['x-ratelimit-reset'])
  tt.ok(Number.isInteger(reset) && reset >= 0 && reset <= windowS, `${what}: x-ratelimit-reset ${a.headers['x-ratelimit-reset']} in [0, ${windowS}]`)
  tt.equal(a.headers['ratelimit-limit'], a.headers['x-ratelimit-limit'], `${what}: ratelimit-limit`)
  tt.equal(a.headers['ratelimit-remaining'], a.headers['x-ratelimit-remaining'], `${what}: ratelimit-remaining`)
  tt.equal(a.headers['ratelimit-reset'], a.headers['x-ratelimit-reset'], `${what}: ratelimit-reset`)
}

function assert429 (tt: Test, a: Answer, windowS: number, what: string): void {
  tt.equal(a.status, 429, `${what}: 429`)
  tt.match(a.headers['content-type'], /^application\/json/, `${what}: JSON`)
  tt.equal((JSON.parse(a.body) as { error?: string }).error, 'rate_limited', `${what}: body error`)
  const retry = Number(a.headers['retry-after'])
  tt.ok(Number.isInteger(retry) && retry >= 1 && retry <= windowS, `${what}: Retry-After ${a.headers['retry-after']} in [1, ${windowS}]`)
}

// ---------------------------------------------------------------------------------------------------------------------

t.test('per-user limit: headers on every response; over it 429 + Retry-After + JSON, audited, counted, never proxied', async (t) => {
  const g = await gateway(t, { RATE_LIMIT_MAX: '3', RATE_LIMIT_WINDOW: '5s' })
  const sub = randomSub('limited')
  const token = await issuer.token({ sub })
  const path = `/api/${randomSub('p')}`
  const httpBefore = await triggered(g, 'http')
  const wsBefore = await triggered(g, 'ws')

  for (let i = 0; i < 3; i++) {
    const a = await request(g, `${path}?n=${i}`, { token })
    t.equal(a.status, 200, `request ${i + 1} allowed`)
    assertLimitHeaders(t, a, 3, 2 - i, 5, `request ${i + 1}`)
  }
  const denied: Answer[] = []
  for (let i = 3; i < 5; i++) denied.push(await request(g, `${path}?n=${i}`, { token }))
  for (const [i, a] of denied.entries()) {
    assert429(t, a, 5, `request ${i + 4}`)
    assertLimitHeaders(t, a, 3, 0, 5, `request ${i + 4} (429)`)
  }

  t.equal(upstream.requests.filter((r) => r.url.startsWith(path)).length, 3, 'the app saw exactly the 3 allowed requests')
  t.same(upstream.requests.filter((r) => r.url.startsWith(path)).map((r) => r.url), [0, 1, 2].map((i) => `${path}?n=${i}`), 'and none of the 429s')

  const audits = rateLimitAudits(g, sub)
  t.equal(audits.length, 2, 'one audit line per 429')
  for (const [i, a] of audits.entries()) {
    t.match(a, { component: 'audit', event: 'rate_limited', reason: 'user_limit', transport: 'http', status: 429, sub, ip: '127.0.0.1', method: 'GET', path }, `audit line ${i + 1} fields`)
    t.equal(a.reqId, denied[i]?.headers['x-request-id'], `audit line ${i + 1} carries the request id`)
    t.equal(a.level, 40, 'audit lines are warnings')
  }
  t.notOk(JSON.stringify(audits).includes(token), 'no token in audit lines')
  t.equal(await triggered(g, 'http') - httpBefore, 2, 'resonance_rate_limit_triggered_total{transport="http"} +2')
  t.equal(await triggered(g, 'ws') - wsBefore, 0, 'transport="ws" unchanged')
})

t.test('two users have independent budgets', async (t) => {
  const g = await gateway(t, { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '5s' })
  const [a, b] = await Promise.all([issuer.token({ sub: randomSub('a') }), issuer.token({ sub: randomSub('b') })])
  t.same(await statuses(g, '/api/x', a, 3), [200, 200, 429], 'user A exhausts its budget')
  const first = await request(g, '/api/x', { token: b })
  t.equal(first.status, 200, 'user B is not affected')
  assertLimitHeaders(t, first, 2, 1, 5, 'user B first request')
  t.same(await statuses(g, '/api/x', b, 2), [200, 429], 'user B has exactly its own budget')
  t.equal((await request(g, '/api/x', { token: a })).status, 429, 'user A is still limited')
})

t.test('the window resets: allowed again once it ends, with a full budget', async (t) => {
  const g = await gateway(t, { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '1s' })
  const token = await issuer.token({ sub: randomSub('reset') })
  t.same(await statuses(g, '/api/r', token, 3), [200, 200, 429], 'limited inside the window')
  const limitedAt = Date.now()
  let a: Answer | undefined
  await until(async () => { a = await request(g, '/api/r', { token }); return a.status === 200 }, 3000, 'allowed again after the window')
  const waited = Date.now() - limitedAt
  t.ok(waited <= 1800, `allowed again ${waited} ms after the 429 (window 1 s)`)
  assertLimitHeaders(t, a as Answer, 2, 1, 1, 'first request of the new window')
  t.same(await statuses(g, '/api/r', token, 2), [200, 429], 'the new window has the same budget')
})

t.test('GET, POST, other paths and WebSocket upgrades of one user share one budget', async (t) => {
  const g = await gateway(t, { RATE_LIMIT_MAX: '4', RATE_LIMIT_WINDOW: '5s' })
  const sub = randomSub('mixed')
  const token = await issuer.token({ sub })
  const path = `/api/${randomSub('m')}`
  const wsBefore = await triggered(g, 'ws')
  const upstreamWsBefore = upstream.wsConnections.length

  t.equal((await request(g, `${path}/a`, { token })).status, 200, 'GET 1/4')
  const post = await request(g, `${path}/b`, { token, method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"x":1}' })
  t.equal(post.status, 200, 'POST 2/4')
  t.equal(post.headers['x-ratelimit-remaining'], '2', 'POST counted against the same budget as GET')
  t.equal((await request(g, `${path}/c`, { token, method: 'DELETE' })).status, 200, 'DELETE 3/4')
  const ws = await upgradeAs(t, g, '/ws/room', token)
  t.equal(ws.kind, 'open', 'WebSocket upgrade 4/4 is allowed and counted')
  if (ws.kind === 'open') ws.ws.close()

  t.equal((await request(g, `${path}/a`, { token })).status, 429, 'GET over the budget')
  t.equal((await request(g, `${path}/b`, { token, method: 'POST', body: '{}', headers: { 'content-type': 'application/json' } })).status, 429, 'POST over the budget')

  const refused = await upgradeAs(t, g, '/ws/room', token)
  t.equal(refused.kind, 'refused', 'the next upgrade is refused before any 101')
  if (refused.kind === 'refused') {
    t.equal(refused.status, 429, 'upgrade answered 429 (unexpected-response)')
    t.ok(Number(refused.headers['retry-after']) >= 1, 'with Retry-After')
    t.match(refused.headers['content-type'], /^application\/json/, 'and a JSON body')
    t.equal((JSON.parse(refused.body) as { error: string }).error, 'rate_limited')
    t.equal(refused.headers['x-ratelimit-remaining'], '0', 'rate-limit headers on the refused upgrade too')
  }
  t.equal(upstream.wsConnections.length - upstreamWsBefore, 1, 'the app saw only the allowed WebSocket')
  t.equal(upstream.requests.filter((r) => r.url.startsWith(path)).length, 3, 'the app saw only the 3 allowed HTTP requests')

  const wsAudit = rateLimitAudits(g, sub).filter((l) => l.transport === 'ws')
  t.equal(wsAudit.length, 1, 'one audit line for the refused upgrade')
  t.match(wsAudit[0], { event: 'rate_limited', reason: 'user_limit', transport: 'ws', status: 429, sub, method: 'GET', path: '/ws/room' })
  t.equal(rateLimitAudits(g, sub).filter((l) => l.transport === 'http').length, 2, 'the two HTTP 429s are audited as transport http')
  t.equal(await triggered(g, 'ws') - wsBefore, 1, 'resonance_rate_limit_triggered_total{transport="ws"} +1')
})

t.test('per-route rules: own budget, most specific rule wins, path spelling cannot dodge it', async (t) => {
  const yaml = `
rateLimit:
  routes:
    - path: /api/**
      max: 4
      window: 10s
    - path: /api/search
      methods: [GET]
      max: 2
      window: 10s
`
  const g = await gateway(t, { RATE_LIMIT_MAX: '3', RATE_LIMIT_WINDOW: '10s' }, yaml)
  const sub = randomSub('routes')
  const token = await issuer.token({ sub })

  const s1 = await request(g, '/api/search?q=1', { token })
  t.equal(s1.status, 200)
  assertLimitHeaders(t, s1, 2, 1, 10, 'GET /api/search uses its own rule (the more specific one, listed second)')
  t.equal((await request(g, '/api/search?q=2', { token })).status, 200, 'GET /api/search 2/2')
  const s3 = await request(g, '/api/search?q=3', { token })
  assert429(t, s3, 10, 'GET /api/search 3/2')
  t.equal((await request(g, '/API/Search/', { token })).status, 429, 'same rule for /API/Search/ (normalised path)')
  t.equal((await request(g, '/api/./search', { token })).status, 429, 'same rule for /api/./search')

  const p1 = await request(g, '/api/search', { token, method: 'POST', body: 'x', headers: { 'content-type': 'text/plain' } })
  t.equal(p1.status, 200, 'POST /api/search is not covered by the GET-only rule')
  assertLimitHeaders(t, p1, 4, 3, 10, 'POST /api/search falls to /api/**')
  t.same(await statuses(g, '/api/items', token, 4), [200, 200, 200, 429], '/api/items shares the /api/** budget with POST /api/search')

  const other = await request(g, '/other', { token })
  t.equal(other.status, 200, 'a path without a rule uses the user budget')
  assertLimitHeaders(t, other, 3, 2, 10, 'user budget untouched by route-rule traffic')

  const audit = rateLimitAudits(g, sub).find((l) => l.path === '/api/search')
  t.match(audit, { event: 'rate_limited', reason: 'route_limit', transport: 'http', status: 429, sub })
})

t.test('per-role budgets: premium gets 1000/min, the first matching role rule applies, a route rule is more specific', async (t) => {
  const yaml = `
rateLimit:
  roles:
    - role: premium
      max: 1000
      window: 1m
    - role: bronze
      max: 4
      window: 10s
  routes:
    - path: /api/export
      max: 1
      window: 10s
`
  const g = await gateway(t, { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '10s' }, yaml)
  const [premium, bronze, both, plain] = await Promise.all([
    issuer.token({ sub: randomSub('premium'), realmRoles: ['user', 'premium'] }),
    issuer.token({ sub: randomSub('bronze'), realmRoles: ['bronze'] }),
    issuer.token({ sub: randomSub('both'), realmRoles: ['bronze', 'premium'] }),
    issuer.token({ sub: randomSub('plain'), realmRoles: ['user'] })
  ])

  const p = await request(g, '/api/p', { token: premium })
  assertLimitHeaders(t, p, 1000, 999, 60, 'premium')
  t.ok(Number(p.headers['x-ratelimit-reset']) > 50, 'premium window is a minute')
  t.same(await statuses(g, '/api/p', premium, 9), Array(9).fill(200), 'premium goes well past the default budget of 2')

  t.equal((await request(g, '/api/b', { token: bronze })).headers['x-ratelimit-limit'], '4', 'bronze budget')
  t.same(await statuses(g, '/api/b', bronze, 4), [200, 200, 200, 429], 'bronze limited at 4')
  t.equal((await request(g, '/api/both', { token: both })).headers['x-ratelimit-limit'], '1000', 'the first role rule in YAML order wins')
  t.same(await statuses(g, '/api/plain', plain, 3), [200, 200, 429], 'no role rule: the default budget')

  const e = await request(g, '/api/export', { token: premium })
  t.equal(e.headers['x-ratelimit-limit'], '1', 'a route rule beats the premium role')
  t.equal((await request(g, '/api/export', { token: premium })).status, 429, 'route rule enforced for premium')
  t.equal((await request(g, '/api/p', { token: premium })).status, 200, 'premium user budget unaffected')
})

t.test('exempt subs and roles (service accounts) are never limited and never counted', async (t) => {
  const svc = randomSub('svc')
  const yaml = `
rateLimit:
  exempt:
    subs: [${svc}]
    roles: [service-account]
  routes:
    - path: /api/**
      max: 1
      window: 10s
`
  const g = await gateway(t, { RATE_LIMIT_MAX: '1', RATE_LIMIT_WINDOW: '10s' }, yaml)
  const roleSub = randomSub('robot')
  const [bySub, byRole, normal] = await Promise.all([
    issuer.token({ sub: svc }),
    issuer.token({ sub: roleSub, realmRoles: ['service-account'] }),
    issuer.token({ sub: randomSub('human') })
  ])
  t.same(await statuses(g, '/api/a', bySub, 6), Array(6).fill(200), 'exempt sub: no limit, even under a route rule')
  t.same(await statuses(g, '/other', bySub, 3), Array(3).fill(200), 'exempt sub: no user limit')
  t.same(await statuses(g, '/other', byRole, 6), Array(6).fill(200), 'exempt role: no limit')
  for (let i = 0; i < 3; i++) {
    const ws = await upgradeAs(t, g, '/ws/svc', byRole)
    t.equal(ws.kind, 'open', `exempt role: upgrade ${i + 1} allowed`)
    if (ws.kind === 'open') ws.ws.close()
  }
  t.same(await statuses(g, '/other', normal, 2), [200, 429], 'everybody else is limited')
  const keys = await scanKeys(redis, g.prefix)
  t.notOk(keys.some((k) => k.includes(svc) || k.includes(roleSub)), 'no counter kept for exempt callers')
  t.equal(rateLimitAudits(g).filter((l) => l.sub === svc || l.sub === roleSub).length, 0, 'no rate_limited audit for exempt callers')
})

t.test('keys carry RATE_LIMIT_KEY_PREFIX: visible in Redis, and two prefixes on one Redis are separate gateways', async (t) => {
  const g1 = await gateway(t, { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '10s' })
  const g2 = await gateway(t, { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '10s' })
  const sub = randomSub('prefix')
  const token = await issuer.token({ sub })
  t.same(await statuses(g1, '/api/k', token, 3), [200, 200, 429], 'gateway 1 limits the user')
  t.same(await statuses(g2, '/api/k', token, 2), [200, 200], 'gateway 2 (other prefix) has its own budget for the same user')

  const keys1 = await scanKeys(redis, g1.prefix)
  const keys2 = await scanKeys(redis, g2.prefix)
  t.comment(`keys: ${JSON.stringify(keys1)} ${JSON.stringify(keys2)}`)
  const userKey = keys1.find((k) => k.includes(sub))
  t.ok(userKey !== undefined && userKey.startsWith(g1.prefix), `SCAN ${g1.prefix}* shows the user's counter`)
  t.equal(await redis.get(userKey as string), '3', 'one atomic counter per user per window, counting every request')
  const pttl = await redis.pttl(userKey as string)
  t.ok(pttl > 0 && pttl <= 10_000, `the counter expires with the window (PTTL ${pttl})`)
  t.equal(keys2.filter((k) => k.includes(sub)).length, 1, 'gateway 2 wrote under its own prefix')
  const unprefixed = (await scanKeys(redis, '')).filter((k) => k.includes(sub) && !k.startsWith(g1.prefix) && !k.startsWith(g2.prefix))
  t.same(unprefixed, [], 'no key for the user outside the configured prefixes')
})

t.test('public paths are limited per client IP (TRUST_PROXY honoured)', async (t) => {
  const yaml = `
auth:
  publicPaths: [/public/**]
`
  const g = await gateway(t, { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '10s', TRUST_PROXY: '127.0.0.1' }, yaml)
  const from = (ip: string): { headers: Record<string, string> } => ({ headers: { 'x-forwarded-for': ip } })
  const a1 = await request(g, '/public/page', from('203.0.113.7'))
  t.equal(a1.status, 200, 'public path served without a token')
  assertLimitHeaders(t, a1, 2, 1, 10, 'public path')
  t.equal((await request(g, '/public/other', from('203.0.113.7'))).status, 200)
  const a3 = await request(g, '/public/page', from('203.0.113.7'))
  assert429(t, a3, 10, 'third public request from one IP')
  t.equal((await request(g, '/public/page', from('203.0.113.8'))).status, 200, 'another client IP has its own budget')
  const token = await issuer.token({ sub: randomSub('behind-ip') })
  t.equal((await request(g, '/api/x', { token, ...from('203.0.113.7') })).status, 200, 'an authenticated user behind that IP is limited by sub, not IP')
  t.match(rateLimitAudits(g).find((l) => l.ip === '203.0.113.7'), { event: 'rate_limited', reason: 'ip_limit', status: 429, transport: 'http', path: '/public/page' })
})

t.test('failed tokens are limited per client IP; no token and valid tokens never are (AUTH_FAILURE_LIMIT_MAX=5, TRUST_PROXY)', async (t) => {
  const g = await gateway(t, {
    AUTH_FAILURE_LIMIT_MAX: '5',
    AUTH_FAILURE_LIMIT_WINDOW: '30s',
    TRUST_PROXY: '127.0.0.1',
    JWKS_MIN_REFRESH_INTERVAL: '0' // every made-up kid would refetch the JWKS: shows what the block saves
  })
  const bad = { headers: { 'x-forwarded-for': '198.51.100.1' } }
  const other = { headers: { 'x-forwarded-for': '198.51.100.2' } }
  const sub = randomSub('victim')
  const valid = await issuer.token({ sub })
  const madeUp = (i: number): Promise<string> =>
    issuer.sign({ iss: issuer.issuer, aud: issuer.audience, sub, exp: Math.floor(Date.now() / 1000) + 300, typ: 'Bearer' }, { kid: `made-up-${randomUUID()}-${i}` })
  const httpBefore = await triggered(g, 'http')

  // Requests without a token cost nothing and are not counted: a NAT full of logged-out browsers locks nobody out.
  for (let i = 0; i < 12; i++) t.equal((await request(g, '/api/x', bad)).status, 401, `no token ${i + 1}/12: 401`)
  t.notOk((await scanKeys(redis, g.prefix)).some((k) => k.includes('198.51.100.1')), 'no failure counted for requests without a token')

  // Failures are counted in the background (the 401 does not wait for Redis): wait until each one is counted, so the
  // test checks the limit itself and not that race.
  for (let i = 0; i < 5; i++) {
    const a = await request(g, '/api/x', { token: `garbage.${i}.token`, ...bad })
    t.equal(a.status, 401, `bad token ${i + 1}/5: 401`)
    await failuresCounted(g.prefix, '198.51.100.1', i + 1)
  }
  const sixth = await request(g, '/api/x', { token: 'garbage.6.token', ...bad })
  const seventh = await request(g, '/api/x', { token: 'garbage.7.token', ...bad })
  for (const [n, a] of [[6, sixth], [7, seventh]] as const) {
    t.equal(a.status, 429, `bad token ${n} after 5 counted failures: 429`)
    t.match(a.headers['content-type'], /^application\/json/, `request ${n}: JSON body`)
    t.equal((JSON.parse(a.body) as { error?: string }).error, 'rate_limited', `request ${n}: error rate_limited`)
    t.ok(Number(a.headers['retry-after']) >= 1 && Number(a.headers['retry-after']) <= 30, `request ${n}: Retry-After ${a.headers['retry-after']}`)
  }

  const notJwt = await request(g, '/api/x', { token: 'not-even-a-jwt', ...bad })
  t.equal(notJwt.status, 429, 'a token that is not even JWT-shaped from the blocked IP: 429 too')

  const before = upstream.requests.length
  const v = await request(g, '/api/valid', { token: valid, ...bad })
  t.equal(v.status, 200, 'a valid token from the blocked IP is verified and served: the limit never locks out a real user')
  t.equal(upstream.requests.length, before + 1, 'it reached the app')
  t.equal(upstream.requests.at(-1)?.headers['x-user-sub'], sub)
  t.equal((await request(g, '/api/x', bad)).status, 401, 'no token from the blocked IP: still the plain 401 (not 429)')

  const jwksBefore = issuer.stats.jwks
  for (let i = 0; i < 5; i++) {
    t.equal((await request(g, '/api/x', { token: await madeUp(i), ...bad })).status, 429, `made-up kid ${i + 1} from the blocked IP: 429`)
  }
  t.equal(issuer.stats.jwks, jwksBefore, 'no JWKS fetch for made-up kids once blocked: the flood never reaches Keycloak')
  const [h, p] = (await issuer.token({ sub })).split('.')
  const forged = `${h as string}.${p as string}.${valid.split('.')[2] as string}`
  t.equal((await request(g, '/api/x', { token: forged, ...bad })).status, 429, 'a known kid with a bad signature from the blocked IP: 429 after one signature check')
  t.equal(upstream.requests.length, before + 1, 'no bad token reached the app')

  t.equal((await request(g, '/api/x', { token: await madeUp(99), ...other })).status, 401, 'another client IP (X-Forwarded-For from the trusted proxy) is verified as usual')
  t.ok(issuer.stats.jwks > jwksBefore, 'control: its made-up kid did cost a JWKS fetch')
  t.equal((await request(g, '/api/valid', { token: valid, ...other })).status, 200, 'and a valid token from it is served')

  const audits = g.audits().filter((l) => l.reason === 'auth_failures')
  t.equal(audits.length, 3 + 5 + 1, `every refused request of the blocked IP audited once (${audits.length})`)
  t.match(audits[0], { component: 'audit', event: 'rate_limited', reason: 'auth_failures', status: 429, transport: 'http', ip: '198.51.100.1' })
  t.equal(await triggered(g, 'http') - httpBefore, audits.length, 'counted in resonance_rate_limit_triggered_total')
  t.ok((await scanKeys(redis, g.prefix)).some((k) => k.includes('198.51.100.1')), 'failures counted in Redis under the prefix (shared by replicas)')

  // upgrades: a valid token opens, a bad one is refused with 429, audited as transport ws
  const fresh = await issuer.token({ sub })
  const ok = await upgradeAs(t, g, '/ws/x', fresh, bad.headers)
  t.match(ok, { kind: 'open' }, 'WebSocket upgrade with a valid token from the blocked IP: opens')
  if (ok.kind === 'open') ok.ws.close()
  const ws = await upgradeAs(t, g, '/ws/x', await madeUp(100), bad.headers)
  t.match(ws, { kind: 'refused', status: 429 }, 'WebSocket upgrade with a made-up kid from the blocked IP: 429')
  t.ok(g.audits().some((l) => l.reason === 'auth_failures' && l.transport === 'ws'), 'audited with transport ws')
})

t.test('without TRUST_PROXY, X-Forwarded-For cannot split the auth-failure budget', async (t) => {
  const g = await gateway(t, { AUTH_FAILURE_LIMIT_MAX: '3', AUTH_FAILURE_LIMIT_WINDOW: '30s' })
  const codes: number[] = []
  for (let i = 0; i < 5; i++) {
    const status = (await request(g, '/api/x', { token: `nope.${i}.x`, headers: { 'x-forwarded-for': `192.0.2.${i + 1}` } })).status
    codes.push(status)
    if (status === 401) await failuresCounted(g.prefix, '127.0.0.1', i + 1)
  }
  t.same(codes, [401, 401, 401, 429, 429], 'every failure counts for the real peer 127.0.0.1: 3 failures, then 429')
  t.ok(codes.filter((c) => c === 429).length >= 1, 'X-Forwarded-For from an untrusted peer does not dodge the limit')
  t.match(g.audits().find((l) => l.reason === 'auth_failures'), { ip: '127.0.0.1' })
})

t.test('no REDIS_URL: in-process limits with a loud startup warning', async (t) => {
  const g = await gateway(t, { RATE_LIMIT_MAX: '2', RATE_LIMIT_WINDOW: '10s' }, '', false)
  const warning = g.logs().find((l) => typeof l.msg === 'string' && l.msg.includes('REDIS_URL'))
  t.ok(warning, 'a startup warning names REDIS_URL')
  t.equal(warning?.level, 40, 'logged at warn level')
  t.match(warning?.msg, /in-process|this process only/, 'and says limits are per process')
  const token = await issuer.token({ sub: randomSub('local') })
  t.same(await statuses(g, '/api/l', token, 3), [200, 200, 429], 'limits still enforced, in process')
  const ready = await (await fetch(`${g.adminUrl}/readyz`)).json() as { checks: Record<string, unknown> }
  t.notOk('redis' in ready.checks, 'no redis readiness check without Redis')
})
