// Token revocation through the admin API, across replicas, on real sockets (real issuer, real echo app, real Redis,
// gateways in-process):
//   - POST /revocations needs the ADMIN_TOKEN bearer (401 otherwise, 404 when ADMIN_TOKEN is unset), bad bodies 400;
//   - revoking a `sub` on replica A closes that user's WebSockets held on replica B within one second (1008 "token
//     revoked", audit line, close metric); both replicas refuse the old token on HTTP at once; a token issued after the
//     revocation works;
//   - revoking a `jti` closes only that token's connections; another token of the same user keeps working;
//   - a replica started later loads the revocations from Redis;
//   - a revocation that lands while an upgrade is waiting for the app still ends that connection;
//   - "at once" holds against a slow link: the admin API answers only after every replica that received the
//     announcement confirmed it (B behind a TCP proxy that delays Redis's replies by 300 ms);
//   - a replica whose subscriber connection is cut (Redis still answering) is not ready, and has every revocation made
//     meanwhile once it is ready again.
// One RATE_LIMIT_KEY_PREFIX per gateway group on the shared Redis; only those keys are deleted.
import { randomUUID } from 'node:crypto'
import http, { type IncomingMessage } from 'node:http'
import type { AddressInfo, Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import WebSocket, { WebSocketServer } from 'ws'
import { randomSub } from './helpers/issuer.js'
import { getAs, readyz, startBackends, startGateway, untilReady, type Answer, type TestGateway } from './helpers/gateway.js'
import { scanKeys, sharedRedis } from './helpers/redis.js'
import { tcpProxy, type TcpProxy } from './helpers/tcp-proxy.js'
import { connect, echo, refusal, type Closed } from './helpers/ws-client.js'
import { audits, claims, metric, pingPong, until, within } from './helpers/wait.js'

const ADMIN_TOKEN = `admin-${randomUUID()}`

const { issuer, upstream } = await startBackends(t)
// Deleted after every subtest and its gateways ended: this file's prefixes only.
const { url: redis, client: rc, freshPrefix } = await sharedRedis(t)

// --- helpers -----------------------------------------------------------------------------------------------------------

async function gateway (tt: Test, prefix: string, env: Record<string, string> = {}): Promise<TestGateway> {
  const g = await startGateway(tt, issuer, upstream, { env: { REDIS_URL: redis, RATE_LIMIT_KEY_PREFIX: prefix, ADMIN_TOKEN, ...env } })
  await untilReady(g)
  return g
}

async function revoke (g: TestGateway, body: unknown, opts: { auth?: string | null, raw?: string, type?: string } = {}): Promise<Answer> {
  const headers: Record<string, string> = { 'content-type': opts.type ?? 'application/json' }
  const auth = opts.auth === undefined ? `Bearer ${ADMIN_TOKEN}` : opts.auth
  if (auth !== null) headers.authorization = auth
  const res = await fetch(`${g.adminUrl}/revocations`, { method: 'POST', headers, body: opts.raw ?? JSON.stringify(body) })
  return { status: res.status, headers: res.headers, body: await res.text() }
}

const M = {
  revokedCloses: 'resonance_ws_closes_total{reason="revoked"}',
  revokedWs: 'resonance_auth_failures_total{reason="revoked",transport="ws"}',
  revokedHttp: 'resonance_auth_failures_total{reason="revoked",transport="http"}',
  announced: (result: string) => `resonance_revocation_announcements_total{result="${result}"}`
}

// --- the admin API ---------------------------------------------------------------------------------------------------

t.test('POST /revocations: ADMIN_TOKEN bearer required, bad bodies refused, 404 when ADMIN_TOKEN is unset', async (t) => {
  const prefix = freshPrefix()
  const g = await gateway(t, prefix)
  const valid = { sub: randomSub('nobody') }

  for (const [what, auth] of [
    ['no Authorization', null],
    ['a wrong token', `Bearer ${ADMIN_TOKEN}x`],
    ['a prefix of the token', `Bearer ${ADMIN_TOKEN.slice(0, -1)}`],
    ['the token under Basic', `Basic ${ADMIN_TOKEN}`],
    ['an empty bearer', 'Bearer '],
    ['a user access token', `Bearer ${await issuer.token({ sub: 'admin' })}`]
  ] as const) {
    const res = await revoke(g, valid, { auth })
    t.equal(res.status, 401, `${what}: 401`)
    t.match(res.headers.get('www-authenticate'), /^Bearer /, `${what}: Bearer challenge`)
  }
  t.ok(audits(g, { event: 'admin_denied' }).length >= 6, 'each refusal is audited as admin_denied')

  for (const [what, body, raw] of [
    ['an empty object', {}, undefined],
    ['both jti and sub', { jti: 'a', sub: 'b' }, undefined],
    ['an unknown field', { user: 'b' }, undefined],
    ['an empty jti', { jti: '' }, undefined],
    ['a numeric sub', { sub: 42 }, undefined],
    ['an array', [{ sub: 'b' }], undefined],
    ['broken JSON', undefined, '{"sub":'],
    ['no body', undefined, '']
  ] as const) {
    const res = await revoke(g, body, raw !== undefined ? { raw } : {})
    t.equal(res.status, 400, `${what}: 400`)
  }
  t.strictSame((await scanKeys(rc, prefix)).filter((k) => k.includes('rev:sub:') || k.includes('rev:jti:')), [], 'nothing was revoked by the refused calls')

  const off = await startGateway(t, issuer, upstream, { env: { REDIS_URL: redis, RATE_LIMIT_KEY_PREFIX: freshPrefix() } })
  t.equal((await revoke(off, valid)).status, 404, 'ADMIN_TOKEN unset: 404, even with a bearer')
  t.equal((await revoke(off, valid, { auth: null })).status, 404, 'and without one')
})

// --- two replicas --------------------------------------------------------------------------------------------------------

t.test('revocation across two replicas sharing Redis', async (t) => {
  const prefix = freshPrefix()
  const a = await gateway(t, prefix)
  const b = await gateway(t, prefix)
  const sub = randomSub('revokee')
  const old = await issuer.token({ sub })
  let issuedBefore = 0

  await t.test('revoke {sub} on A: the WebSocket held on B closes within 1 s with 1008, audited; both refuse HTTP', async (t) => {
    const onB = await connect(b, old)
    const onA = await connect(a, old)
    const bystander = await connect(b, await issuer.token({ sub: randomSub('bystander') }))
    await echo(onB, 'before')
    t.equal((await getAs(a, old)).status, 200, 'valid on A before')
    t.equal((await getAs(b, old)).status, 200, 'valid on B before')
    const before = { closes: await metric(b, M.revokedCloses), ws: await metric(b, M.revokedWs), http: await metric(b, M.revokedHttp) }

    const started = Date.now()
    const res = await revoke(a, { sub })
    t.equal(res.status, 201)
    const answer = JSON.parse(res.body) as { kind: string, value: string, issuedBefore: number, expiresAt: string }
    t.match(answer, { kind: 'sub', value: sub, issuedBefore: Number })
    issuedBefore = answer.issuedBefore
    t.ok(Date.parse(answer.expiresAt) > Date.now(), 'expires in the future')
    // HTTP first, "at once": no waiting on either replica
    const [httpA, httpB] = await Promise.all([getAs(a, old), getAs(b, old)])
    t.equal(httpA.status, 401, 'A refuses the old token at once')
    t.equal(httpB.status, 401, 'B refuses the old token at once')
    t.match(httpB.headers.get('www-authenticate'), /error="invalid_token"/)

    const closedB = await within(onB.closed, 1500, 'the WebSocket on B closed')
    t.ok(closedB.at - started <= 1000, `B closed it ${closedB.at - started} ms after the revocation request`)
    t.equal(closedB.code, 1008)
    t.equal(closedB.reason, 'token revoked')
    t.equal((await within(onA.closed, 1500, 'A closed')).code, 1008, 'and A closed its own')

    t.match(audits(b, { event: 'auth_failure', reason: 'revoked', transport: 'ws', sub }), [{ path: onB.path, status: 1008 }], 'audit line on B')
    t.match(audits(b, { event: 'auth_failure', reason: 'revoked', transport: 'http', sub }), [{ status: 401 }], 'HTTP refusal audited on B')
    t.match(audits(a, { event: 'auth_failure', reason: 'revoked', transport: 'http', sub }), [{ status: 401 }], 'and on A')
    t.equal(await metric(b, M.revokedCloses) - before.closes, 1, 'resonance_ws_closes_total{reason="revoked"}')
    t.equal(await metric(b, M.revokedWs) - before.ws, 1, 'resonance_auth_failures_total{reason="revoked",transport="ws"}')
    t.equal(await metric(b, M.revokedHttp) - before.http, 1, 'resonance_auth_failures_total{reason="revoked",transport="http"}')
    await until(() => upstream.wsConnections.find((r) => r.url === onB.path)?.closed !== undefined, 2000, 'the app side closed too')

    t.match(await refusal(b, old), { status: 401, upgraded: false }, 'a new upgrade with the old token: 401 before any 101')
    await echo(bystander, 'unaffected')
    t.equal(bystander.ws.readyState, WebSocket.OPEN, 'another user\'s connection on B stays')
    bystander.ws.close()
    const pttl = await rc.pttl(`${prefix}rev:sub:${sub}`)
    t.ok(pttl > 0, `stored in Redis with a TTL (${pttl} ms)`)
  })

  await t.test('a token issued more than 1 s after the revocation works', async (t) => {
    // time-based by nature: iat has a 1 s resolution, so the clock must pass the next second
    await sleep(Math.max(0, (issuedBefore + 1) * 1000 + 100 - Date.now()))
    const fresh = await issuer.token({ sub })
    t.ok(claims(fresh).iat > issuedBefore)
    t.equal((await getAs(a, fresh)).status, 200, 'A accepts it')
    t.equal((await getAs(b, fresh)).status, 200, 'B accepts it')
    const c = await connect(b, fresh)
    await echo(c, 'welcome back')
    // time-based by nature ("no close within 300 ms"): the gateway answers a connection it keeps with no event
    await sleep(300)
    t.equal(c.ws.readyState, WebSocket.OPEN, 'and its WebSocket stays open')
    c.ws.close()
  })

  const jUser = randomSub('twotokens')
  const j1 = await issuer.token({ sub: jUser })
  const j2 = await issuer.token({ sub: jUser })

  await t.test('revoke {jti}: only that token\'s connections close, another token of the same user keeps working', async (t) => {
    t.not(claims(j1).jti, claims(j2).jti, 'two tokens, two jtis')
    const c1 = await connect(b, j1)
    const c1a = await connect(a, j1)
    const c2 = await connect(b, j2)
    const c2a = await connect(a, j2)
    const started = Date.now()
    t.equal((await revoke(a, { jti: claims(j1).jti })).status, 201)
    const [h1a, h1b] = await Promise.all([getAs(a, j1), getAs(b, j1)])
    t.equal(h1a.status, 401, 'A refuses the revoked token')
    t.equal(h1b.status, 401, 'B refuses the revoked token')
    const closed = await within(c1.closed, 1500, 'the revoked token\'s connection on B')
    t.ok(closed.at - started <= 1000, `closed ${closed.at - started} ms after the request`)
    t.match(closed, { code: 1008, reason: 'token revoked' })
    t.equal((await within(c1a.closed, 1500, 'on A')).code, 1008)
    t.match(audits(b, { event: 'auth_failure', reason: 'revoked', transport: 'ws', sub: jUser }), [{ path: c1.path }])
    // both replicas acted on the revocation (c1 and c1a closed); a pong orders after any close frame sent before it
    for (const c of [c2, c2a]) await pingPong(c.ws)
    for (const c of [c2, c2a]) {
      t.equal(c.ws.readyState, WebSocket.OPEN, 'the other token\'s connection stays open')
      await echo(c, `still here ${c.path}`)
    }
    t.equal((await getAs(a, j2)).status, 200, 'the other token works on A')
    t.equal((await getAs(b, j2)).status, 200, 'and on B')
    t.ok(await rc.pttl(`${prefix}rev:jti:${claims(j1).jti}`) > 0, 'stored in Redis with a TTL')
    c2.ws.close()
    c2a.ws.close()
  })

  await t.test('a replica started later loads the revocations from Redis', async (t) => {
    const c = await gateway(t, prefix)
    t.equal((await getAs(c, old)).status, 401, 'the sub revocation applies')
    t.match(audits(c, { event: 'auth_failure', reason: 'revoked', transport: 'http', sub }), [{ status: 401 }])
    t.equal((await getAs(c, j1)).status, 401, 'the jti revocation applies')
    t.equal((await getAs(c, j2)).status, 200, 'the other token does not')
    t.equal((await getAs(c, await issuer.token({ sub }))).status, 200, 'nor a token issued after the sub revocation')
    t.match(await refusal(c, old), { status: 401, upgraded: false }, 'WebSocket upgrades too')
    t.match(await refusal(c, j1), { status: 401, upgraded: false })
  })
})

// --- a revocation racing an upgrade --------------------------------------------------------------------------------------

/** An app that answers WebSocket upgrades only after `delayMs` (a slow app, or a slow network to it). */
async function startSlowApp (delayMs: number): Promise<{ url: string, upgrades: () => number, close: () => Promise<void> }> {
  let upgrades = 0
  const server = http.createServer((_req, res) => res.end())
  const wss = new WebSocketServer({ noServer: true })
  wss.on('connection', (ws) => {
    ws.on('message', (d, binary) => ws.send(d, { binary }))
    ws.on('error', () => {})
  })
  server.on('upgrade', (req, socket: Socket, head) => {
    upgrades++
    setTimeout(() => { if (!socket.destroyed) wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req)) }, delayMs)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    upgrades: () => upgrades,
    close: async () => {
      for (const ws of wss.clients) ws.terminate()
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

t.test('a revocation that lands while the upgrade waits for the app still ends that connection', async (t) => {
  const app = await startSlowApp(800)
  t.teardown(() => app.close())
  const prefix = freshPrefix()
  const g = await gateway(t, prefix, { UPSTREAM_URL: app.url })
  const sub = randomSub('racer')
  const token = await issuer.token({ sub })

  const ws = new WebSocket(`${g.wsUrl}/ws/${randomUUID()}`, { headers: { authorization: `Bearer ${token}` } })
  ws.on('error', () => {})
  const outcome = new Promise<{ kind: 'refused', status: number } | { kind: 'open' }>((resolve) => {
    ws.once('open', () => resolve({ kind: 'open' }))
    ws.once('unexpected-response', (_req, res: IncomingMessage) => { res.resume(); resolve({ kind: 'refused', status: res.statusCode ?? 0 }) })
  })
  const closed = new Promise<Closed>((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString(), at: Date.now() })))
  // authenticated, slot taken, waiting for the app's 101
  await until(() => app.upgrades() === 1, 3000, 'the upgrade reached the app')
  const revokedAt = Date.now()
  t.equal((await revoke(g, { sub })).status, 201)
  const o = await within(outcome, 3000, 'the upgrade finished')
  if (o.kind === 'refused') {
    t.equal(o.status, 401, 'refused before any 101')
  } else {
    const c = await within(closed, 2000, 'the revoked connection closed after its 101').catch(() => undefined)
    t.ok(c !== undefined, 'a connection opened with a revoked token is closed, not left open')
    if (c !== undefined) {
      t.equal(c.code, 1008)
      t.equal(c.reason, 'token revoked')
      t.ok(c.at - revokedAt <= 1500, `closed ${c.at - revokedAt} ms after the revocation`)
    }
  }
  ws.terminate()
})

// --- a replica's link to Redis ----------------------------------------------------------------------------------------

/** Replica A on the shared Redis, replica B on it through a TCP proxy (same prefix). */
async function proxiedPair (tt: Test): Promise<{ a: TestGateway, b: TestGateway, proxy: TcpProxy }> {
  const prefix = freshPrefix()
  const url = new URL(redis)
  const proxy = await tcpProxy(tt, { host: url.hostname, port: Number(url.port) })
  const a = await gateway(tt, prefix)
  url.port = String(proxy.port)
  const b = await gateway(tt, prefix, { REDIS_URL: url.toString() })
  return { a, b, proxy }
}

t.test('the admin API answers once every replica has the revocation, even one whose Redis replies come 300 ms late', async (t) => {
  const { a, b, proxy } = await proxiedPair(t)
  const sub = randomSub('slowlink')
  const old = await issuer.token({ sub })
  t.equal((await getAs(b, old)).status, 200, 'valid on B before')

  proxy.replyDelayMs = 300
  const started = Date.now()
  t.equal((await revoke(a, { sub })).status, 201)
  const took = Date.now() - started
  // B's check comes before its rate-limit call (which waits on the slow link): 200 here means B did not know yet.
  const onB = await getAs(b, old)
  t.equal(onB.status, 401, `B refuses the token once A has answered (A answered after ${took} ms)`)
  t.ok(took >= 300, `A's answer waited for B, whose copy of the announcement came 300 ms late (${took} ms)`)
  t.match(audits(b, { event: 'auth_failure', reason: 'revoked', transport: 'http', sub }), [{ status: 401 }], 'audited on B')
  t.equal(await metric(a, M.announced('confirmed')), 1, 'A counts the announcement confirmed')
  t.equal(await metric(a, M.announced('unconfirmed')), 0)
})

t.test('a receiver that never confirms (an older replica) holds the answer back 1 s at most: counted unconfirmed, logged', async (t) => {
  const prefix = freshPrefix()
  const a = await gateway(t, prefix)
  const mute = rc.duplicate()
  t.teardown(() => mute.disconnect())
  const heard: string[] = []
  mute.on('message', (_channel: string, message: string) => heard.push(message))
  await mute.subscribe(`${prefix}revocations`)
  const sub = randomSub('mute')
  const old = await issuer.token({ sub })

  const started = Date.now()
  t.equal((await revoke(a, { sub })).status, 201, 'revoked all the same')
  const took = Date.now() - started
  t.ok(took >= 1000 && took < 3000, `answered after the 1 s wait (${took} ms)`)
  t.match(JSON.parse(heard[0] ?? '{}'), { kind: 'sub', value: sub, at: Number, expiresAt: Number, id: /^[0-9a-f]{24}$/ }, 'the announcement on the wire: the revocation and its id')
  t.equal(await metric(a, M.announced('unconfirmed')), 1, 'resonance_revocation_announcements_total{result="unconfirmed"}')
  t.equal(await metric(a, M.announced('confirmed')), 0)
  const warnings = a.logs().filter((l) => l.component === 'revocation' && l.level === 40)
  t.equal(warnings.length, 1, 'one warning')
  t.match(warnings[0], { msg: /confirmed by 1 of 2 receivers within 1000 ms/, receivers: 2, confirmed: 1 })
  t.equal((await getAs(a, old)).status, 401, 'and in force on A')
})

t.test('a replica that cannot hear the revocation channel is not ready, and has caught up once it is ready again', async (t) => {
  const { a, b, proxy } = await proxiedPair(t)
  const sub = randomSub('deaf')
  const old = await issuer.token({ sub })
  t.equal((await getAs(b, old)).status, 200, 'valid on B before')

  // B's subscriber connection (the one that sent SUBSCRIBE) is cut and cannot reconnect; its other connection stays.
  proxy.hold()
  t.equal(proxy.cut(/subscribe/i), 1, 'B\'s subscriber connection cut')
  await until(async () => (await readyz(b)).status === 503, 3000, 'B not ready')
  const r = await readyz(b)
  t.match(r.body.checks.revocations, { ok: false, detail: /revocation channel/ }, 'the revocations check says why')
  t.match(r.body.checks.redis, { ok: true }, 'while Redis itself answers')

  t.equal((await revoke(a, { sub })).status, 201, 'revoked on A meanwhile')
  t.equal((await getAs(a, old)).status, 401, 'A refuses it')

  // Slow replies from here on: the rescan after SUBSCRIBE takes a while, and B must not be ready before it is done.
  proxy.replyDelayMs = 150
  proxy.release()
  await untilReady(b, 10_000, 'B ready again')
  t.equal((await getAs(b, old)).status, 401, 'B refuses the token revoked while it could not hear')
})
