// WebSocket sessions through real sockets (a real issuer, a real echo app, real Redis, the gateway in-process):
//   - per-user message limit, strict: the app receives exactly the allowed messages, in order; `close` answers 1008
//     with a reason, `drop` tells the client per dropped message and keeps the connection; audited and counted;
//     the budget is shared by all of a user's connections and by two replicas on one Redis; other users unaffected;
//   - WS_MAX_CONNECTIONS_PER_USER across two replicas: 429 before any 101, audited; leases in the Redis sorted set
//     `<prefix>wsconn:<sub>` expire (a stale lease does not count, a live one does);
//   - a 3-second token gets its connection closed by the gateway at exp (1008 "token expired"), audited;
//   - maxPayload (1009), idle timeout (1000), ping timeout (a client that never answers pings);
//   - bounded buffers both ways: a client that stops reading stops the gateway pulling from the app, an app that stops
//     reading stops the gateway pulling from the client, and the gateway's memory does not follow the flood;
//   - shutdown: readiness fails before sockets get 1001 (in-process close, and SIGTERM on the real entrypoint).
// Every test uses its own RATE_LIMIT_KEY_PREFIX on the shared Redis and deletes only its own keys.
import { randomUUID } from 'node:crypto'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import v8 from 'node:v8'
import vm from 'node:vm'
import t, { type Test } from 'tap'
import WebSocket, { WebSocketServer } from 'ws'
import { randomSub } from './helpers/issuer.js'
import type { RecordedWs } from './helpers/upstream.js'
import { baseEnv, readyz, startBackends, startGateway, untilReady, type TestGateway } from './helpers/gateway.js'
import { spawnGateway } from './helpers/process.js'
import { sharedRedis } from './helpers/redis.js'
import { connect, echo, refusal } from './helpers/ws-client.js'
import { audits, claims, metric, pingPong, until, within } from './helpers/wait.js'

const KiB = 1024
const MiB = 1024 * KiB

v8.setFlagsFromString('--expose-gc')
const gc = vm.runInNewContext('gc') as () => void

const { issuer, upstream } = await startBackends(t)
// After every subtest (and its gateways) ended: only this file's prefixes are deleted, never anything else.
const { url: redis, client: rc, freshPrefix } = await sharedRedis(t)

// --- helpers -----------------------------------------------------------------------------------------------------------

type Gw = TestGateway & { prefix: string }

/** An in-process gateway on the shared Redis with its own (or the given) prefix, ready (JWKS + Redis) on return. */
async function gateway (tt: Test, env: Record<string, string> = {}, opts: { prefix?: string, upstreamUrl?: string } = {}): Promise<Gw> {
  const prefix = opts.prefix ?? freshPrefix()
  const g = await startGateway(tt, issuer, upstream, {
    env: { REDIS_URL: redis, RATE_LIMIT_KEY_PREFIX: prefix, ...(opts.upstreamUrl !== undefined ? { UPSTREAM_URL: opts.upstreamUrl } : {}), ...env }
  })
  await untilReady(g)
  return Object.assign(g, { prefix })
}

const M = {
  limited: 'resonance_rate_limit_triggered_total{transport="ws"}',
  c2a: 'resonance_ws_messages_total{direction="client_to_app"}',
  a2c: 'resonance_ws_messages_total{direction="app_to_client"}',
  open: 'resonance_ws_connections',
  closes: (reason: string) => `resonance_ws_closes_total{reason="${reason}"}`,
  authFailures: (reason: string, transport: string) => `resonance_auth_failures_total{reason="${reason}",transport="${transport}"}`
}

/** What the app recorded for the connection on `path`. */
function appSide (path: string): RecordedWs | undefined {
  return upstream.wsConnections.find((r) => r.url === path)
}
const appMessages = (path: string): string[] => (appSide(path)?.messages ?? []).map((m) => m.data)

/**
 * Live memory of this process (heap + array buffers): the least of 5 readings 40 ms apart, each after a full GC. The
 * memory of ArrayBuffers a GC found dead is given back by a V8 background sweeper after gc() returns, which a busy
 * machine delays: one reading taken at once could count megabytes of garbage (seen: 10.8 MiB on a CI run). Garbage
 * only ever adds, so the least reading is the live figure.
 */
const memory = async (): Promise<number> => {
  let least = Infinity
  for (let i = 0; i < 5; i++) {
    if (i > 0) await sleep(40)
    gc()
    const m = process.memoryUsage()
    least = Math.min(least, m.heapUsed + m.arrayBuffers)
  }
  return least
}

// --- per-user message limit ----------------------------------------------------------------------------------------------

t.test('message limit (close): exactly the allowed messages reach the app, in order; 1008 with a reason; audited and counted', async (t) => {
  const g = await gateway(t, { WS_MESSAGE_LIMIT_MAX: '5', WS_MESSAGE_LIMIT_WINDOW: '60s' })
  const sub = randomSub('limited')
  const token = await issuer.token({ sub })
  const before = { limited: await metric(g, M.limited), closes: await metric(g, M.closes('rate_limited')), c2a: await metric(g, M.c2a) }

  const c = await connect(g, token)
  t.equal(await metric(g, M.open), 1, 'resonance_ws_connections counts the open connection')
  for (let i = 0; i < 8; i++) c.ws.send(`m${i}`)
  const closed = await within(c.closed, 5000, 'close after the 6th message')
  t.equal(closed.code, 1008, 'closed with 1008')
  t.match(closed.reason, /rate limit/, `with a reason (${closed.reason})`)
  // the gateway closes the app's connection after the last message it forwarded on it: once the app saw that close,
  // nothing is left in flight towards the app
  await until(() => appSide(c.path)?.closed !== undefined, 2000, 'the app connection closed too')
  t.strictSame(appMessages(c.path), ['m0', 'm1', 'm2', 'm3', 'm4'], 'the app received exactly m0..m4, in order, and never m5..m7')
  const rec = appSide(c.path)
  t.notOk(JSON.stringify(rec).includes(token), 'the token never reached the app (URL, headers, protocol, messages)')

  const lines = audits(g, { event: 'rate_limited', reason: 'ws_message_limit', sub })
  t.equal(lines.length, 1, 'one audit line')
  t.match(lines[0], { transport: 'ws', status: 1008, path: c.path, method: 'GET' })
  t.equal(await metric(g, M.limited) - before.limited, 1, 'resonance_rate_limit_triggered_total{transport="ws"} moved')
  t.equal(await metric(g, M.closes('rate_limited')) - before.closes, 1, 'resonance_ws_closes_total{reason="rate_limited"} moved')
  t.equal(await metric(g, M.c2a) - before.c2a, 5, 'client_to_app counts the forwarded messages only')
  t.equal(await metric(g, M.open), 0, 'and the gauge is back to 0')
  t.notOk(g.rawLogs.some((l) => l.includes(token)), 'the token is never logged')

  t.test('the budget is per user: the same user\'s next connection is closed at its first message', async (t) => {
    const again = await connect(g, token)
    again.ws.send('late')
    t.equal((await within(again.closed, 5000, 'close')).code, 1008)
    // the app's side closes after anything forwarded on it
    await until(() => appSide(again.path)?.closed !== undefined, 2000, 'the app connection closed too')
    t.strictSame(appMessages(again.path), [], 'the app got nothing')
  })

  t.test('other users are unaffected', async (t) => {
    const other = await connect(g, await issuer.token({ sub: randomSub('other') }))
    for (let i = 0; i < 5; i++) await echo(other, `o${i}`)
    t.strictSame(appMessages(other.path), ['o0', 'o1', 'o2', 'o3', 'o4'])
    t.equal(other.ws.readyState, WebSocket.OPEN, 'still open')
    other.ws.close()
  })
})

t.test('message order is kept under a burst (more messages than the pending queue holds), sizes mixed', async (t) => {
  const g = await gateway(t, { WS_MESSAGE_LIMIT_MAX: '100000' })
  const c = await connect(g, await issuer.token({ sub: randomSub('burst') }))
  const sent = Array.from({ length: 700 }, (_, i) => `${i}:${'x'.repeat((i * 7919) % 5000)}`)
  for (const m of sent) c.ws.send(m)
  await until(() => c.texts.length === sent.length, 15_000, 'all echoes')
  t.ok(appMessages(c.path).every((m, i) => m === sent[i]), 'the app received every message in order')
  t.equal(appMessages(c.path).length, sent.length)
  t.ok(c.texts.every((m, i) => m === sent[i]), 'and the echoes came back in order')
  c.ws.close()
})

t.test('message limit (drop): a rate_limited notice per dropped message, the connection stays, the window resets', async (t) => {
  const g = await gateway(t, { WS_MESSAGE_LIMIT_MAX: '3', WS_MESSAGE_LIMIT_WINDOW: '2s', WS_MESSAGE_LIMIT_ACTION: 'drop' })
  const sub = randomSub('dropper')
  const before = { limited: await metric(g, M.limited), closes: await metric(g, M.closes('rate_limited')) }
  const c = await connect(g, await issuer.token({ sub }))
  for (let i = 0; i < 6; i++) c.ws.send(`m${i}`)
  await until(() => c.texts.length >= 6, 5000, '3 echoes and 3 notices')
  // every message sent has had its answer; the pong orders after anything else the gateway sent meanwhile
  await pingPong(c.ws)
  const notices = c.texts.filter((x) => x.startsWith('{')).map((x) => JSON.parse(x) as { error: string, retry_after: number })
  t.equal(notices.length, 3, 'one notice per dropped message')
  for (const n of notices) {
    t.equal(n.error, 'rate_limited')
    t.ok(Number.isInteger(n.retry_after) && n.retry_after >= 1 && n.retry_after <= 2, `retry_after ${n.retry_after}`)
  }
  t.strictSame(c.texts.filter((x) => !x.startsWith('{')), ['m0', 'm1', 'm2'], 'echoes of the allowed ones only')
  t.strictSame(appMessages(c.path), ['m0', 'm1', 'm2'], 'the app received the allowed ones, in order')
  t.equal(c.ws.readyState, WebSocket.OPEN, 'the connection stays open')
  t.ok(audits(g, { event: 'rate_limited', reason: 'ws_message_limit', transport: 'ws', sub }).length >= 1, 'audited')
  t.equal(await metric(g, M.limited) - before.limited, 3, 'every dropped message counted')
  t.equal(await metric(g, M.closes('rate_limited')) - before.closes, 0, 'nothing closed')

  // the fixed window ends: the counter key expires, the budget is back
  const key = `${g.prefix}wsmsg:${sub}`
  await until(async () => (await rc.exists(key)) === 0, 4000, 'window reset')
  c.texts.length = 0
  for (let i = 0; i < 4; i++) c.ws.send(`n${i}`)
  await until(() => c.texts.length >= 4, 5000, '3 echoes and 1 notice')
  await pingPong(c.ws)
  t.strictSame(c.texts.filter((x) => !x.startsWith('{')), ['n0', 'n1', 'n2'], 'after the window, messages pass again')
  t.equal(c.texts.filter((x) => x.startsWith('{')).length, 1, 'and the 4th of the new window is dropped')
  t.strictSame(appMessages(c.path), ['m0', 'm1', 'm2', 'n0', 'n1', 'n2'])
  c.ws.close()
})

t.test('the message budget is shared by all of a user\'s connections and by two replicas', async (t) => {
  const prefix = freshPrefix()
  const env = { WS_MESSAGE_LIMIT_MAX: '6', WS_MESSAGE_LIMIT_WINDOW: '60s' }
  const a = await gateway(t, env, { prefix })
  const b = await gateway(t, env, { prefix })
  const sub = randomSub('shared')
  const token = await issuer.token({ sub })
  // the token travels three ways; none of them may reach the app
  const a1 = await connect(a, token, { carrier: 'header' })
  const a2 = await connect(a, token, { carrier: 'query' })
  const b1 = await connect(b, token, { carrier: 'protocol' })
  for (const c of [a1, a2, b1]) for (let i = 0; i < 2; i++) await echo(c, `${c.path}#${i}`)
  t.equal(await rc.get(`${prefix}wsmsg:${sub}`), '6', 'one counter in Redis for the user')

  b1.ws.send('seventh')
  t.equal((await within(b1.closed, 5000, 'b1 closed')).code, 1008, 'the 7th message (replica B) closes its connection')
  a1.ws.send('eighth')
  t.equal((await within(a1.closed, 5000, 'a1 closed')).code, 1008, 'and replica A sees the same spent budget')
  // the app's side of each closes after anything forwarded on it
  await until(() => [a1, b1].every((c) => appSide(c.path)?.closed !== undefined), 2000, 'the app connections closed too')
  const total = [a1, a2, b1].flatMap((c) => appMessages(c.path))
  t.equal(total.length, 6, 'the app received exactly 6 messages over the three connections')
  t.notOk(total.includes('seventh') || total.includes('eighth'))
  for (const c of [a1, a2, b1]) {
    t.equal(appSide(c.path)?.url, c.path, 'the app saw the path without access_token')
    t.notOk(JSON.stringify(appSide(c.path)).includes(token), 'the token never reached the app (URL, headers, protocol, messages)')
  }
  t.equal(audits(b, { event: 'rate_limited', reason: 'ws_message_limit', transport: 'ws', sub }).length, 1, 'audited on B')
  t.equal(audits(a, { event: 'rate_limited', reason: 'ws_message_limit', transport: 'ws', sub }).length, 1, 'audited on A')

  const other = await connect(b, await issuer.token({ sub: randomSub('bystander') }))
  for (let i = 0; i < 6; i++) await echo(other, `v${i}`)
  t.equal(other.ws.readyState, WebSocket.OPEN, 'another user on the same replicas keeps a full budget')
  other.ws.close()
  a2.ws.close()
})

// --- connection slots -----------------------------------------------------------------------------------------------------

t.test('WS_MAX_CONNECTIONS_PER_USER across two replicas: 429 before any 101, audited; leases expire', async (t) => {
  const prefix = freshPrefix()
  const env = { WS_MAX_CONNECTIONS_PER_USER: '2' }
  const a = await gateway(t, env, { prefix })
  const b = await gateway(t, env, { prefix })
  const sub = randomSub('capped')
  const token = await issuer.token({ sub })
  const key = `${prefix}wsconn:${sub}`
  const beforeA = await metric(a, M.limited)

  const c1 = await connect(a, token)
  const c2 = await connect(b, token)
  t.equal(await rc.zcard(key), 2, 'two leases in Redis')
  const pttl = await rc.pttl(key)
  t.ok(pttl > 0 && pttl <= 60_000, `the lease set expires unless refreshed (pttl ${pttl})`)

  for (const [name, g] of [['A', a], ['B', b]] as const) {
    const path = `/ws/${randomUUID()}`
    const r = await refusal(g, token, path)
    t.equal(r.status, 429, `third upgrade on replica ${name}: 429`)
    t.notOk(r.upgraded, 'no 101')
    t.ok(Number(r.headers['retry-after']) > 0, 'Retry-After')
    t.match(JSON.parse(r.body), { error: 'rate_limited' })
    t.equal(appSide(path), undefined, 'the app never saw it')
    t.match(audits(g, { event: 'rate_limited', reason: 'ws_connections', sub }), [{ transport: 'ws', status: 429, path }], `audited on ${name}`)
  }
  t.equal(await metric(a, M.limited) - beforeA, 1, 'counted')
  t.equal(await rc.zcard(key), 2, 'refused upgrades hold no lease')
  t.equal(await metric(a, M.open) + await metric(b, M.open), 2, 'resonance_ws_connections: one open on each replica')

  const v1 = await connect(a, await issuer.token({ sub: randomSub('free') }))
  const vTok = await issuer.token({ sub: randomSub('free2') })
  const v2 = await connect(a, vTok)
  const v3 = await connect(b, vTok)
  t.ok([v1, v2, v3].every((v) => v.ws.readyState === WebSocket.OPEN && appSide(v.path) !== undefined), 'other users are not capped by this user: their three connections are open through to the app')
  for (const v of [v1, v2, v3]) v.ws.close()

  c1.ws.close()
  await until(async () => (await rc.zcard(key)) === 1, 3000, 'lease released on close')
  const c3 = await connect(b, token)
  t.ok(c3.ws.readyState === WebSocket.OPEN && appSide(c3.path) !== undefined, 'after one closed, a new connection succeeds: open through to the app')
  t.equal((await refusal(a, token)).status, 429, 'and the cap holds again')

  t.test('a stale lease (a dead replica stopped refreshing) does not count; a live one does', async (t) => {
    const w = randomSub('leases')
    const wTok = await issuer.token({ sub: w })
    const wKey = `${prefix}wsconn:${w}`
    const now = Date.now()
    await rc.zadd(wKey, now - 1000, 'dead-replica-lease-1', now - 30_000, 'dead-replica-lease-2')
    const w1 = await connect(a, wTok)
    const w2 = await connect(b, wTok)
    t.ok([w1, w2].every((w) => w.ws.readyState === WebSocket.OPEN && appSide(w.path) !== undefined), 'two connections despite two leases already in the set: both were past their expiry')
    t.equal(await rc.zscore(wKey, 'dead-replica-lease-1'), null, 'stale leases were swept')
    t.equal(await rc.zcard(wKey), 2)
    t.equal((await refusal(a, wTok)).status, 429, 'the cap still applies to live leases')
    w1.ws.close()
    w2.ws.close()
    await until(async () => (await rc.zcard(wKey)) === 0, 3000, 'released')

    await rc.zadd(wKey, Date.now() + 60_000, 'live-lease-elsewhere')
    const w3 = await connect(a, wTok)
    t.equal((await refusal(b, wTok)).status, 429, 'a live lease of another replica counts')
    w3.ws.close()
    await rc.zrem(wKey, 'live-lease-elsewhere')
  })

  c2.ws.close()
  c3.ws.close()
})

// --- expiry -----------------------------------------------------------------------------------------------------------------

t.test('token expiry: the gateway closes with 1008 "token expired" at exp (+ clock tolerance), audited', async (t) => {
  const g0 = await gateway(t, { JWT_CLOCK_TOLERANCE: '0' })
  const g2 = await gateway(t, { JWT_CLOCK_TOLERANCE: '2' })
  const before = { closes: await metric(g0, M.closes('token_expired')), auth: await metric(g0, M.authFailures('expired', 'ws')) }

  const run = async (g: Gw, ttl: number) => {
    const sub = randomSub('expiring')
    const minted = Date.now()
    const token = await issuer.token({ sub, ttlSeconds: ttl })
    const { exp } = claims(token)
    const c = await connect(g, token)
    await echo(c, 'still valid')
    const closed = await within(c.closed, 10_000, 'close at expiry')
    return { sub, minted, exp, c, closed }
  }
  const [zero, tol] = await Promise.all([run(g0, 3), run(g2, 2)])

  t.equal(zero.closed.code, 1008)
  t.equal(zero.closed.reason, 'token expired')
  const elapsed = zero.closed.at - zero.minted
  t.ok(elapsed >= 2000 && elapsed <= 5000, `a 3 s token closed after ${elapsed} ms`)
  t.ok(zero.closed.at >= zero.exp * 1000 - 5, 'not before exp')
  t.ok(zero.closed.at <= zero.exp * 1000 + 1500, `promptly after exp (${zero.closed.at - zero.exp * 1000} ms)`)
  t.match(audits(g0, { event: 'auth_failure', reason: 'expired', transport: 'ws', sub: zero.sub }), [{ path: zero.c.path, status: 1008 }], 'audit line')
  t.equal(await metric(g0, M.closes('token_expired')) - before.closes, 1, 'resonance_ws_closes_total{reason="token_expired"}')
  t.equal(await metric(g0, M.authFailures('expired', 'ws')) - before.auth, 1, 'resonance_auth_failures_total{reason="expired",transport="ws"}')
  await until(() => appSide(zero.c.path)?.closed !== undefined, 2000, 'the app side closed too')

  t.equal(tol.closed.code, 1008)
  t.ok(tol.closed.at >= (tol.exp + 2) * 1000 - 5, `JWT_CLOCK_TOLERANCE=2: not before exp + 2 s (${tol.closed.at - tol.exp * 1000} ms after exp)`)
  t.ok(tol.closed.at <= (tol.exp + 2) * 1000 + 1500, 'and promptly after it')
})

// --- payload, idle, ping ----------------------------------------------------------------------------------------------------

t.test('WS_MAX_PAYLOAD: a larger client message closes with 1009 and never reaches the app', async (t) => {
  const g = await gateway(t, { WS_MAX_PAYLOAD: '1024' })
  const before = await metric(g, M.closes('message_too_big'))
  const c = await connect(g, await issuer.token({ sub: randomSub('big') }))
  await echo(c, 'a'.repeat(1024))
  c.ws.send(Buffer.alloc(2 * KiB, 'b'))
  const closed = await within(c.closed, 5000, 'close')
  t.equal(closed.code, 1009, '1009 message too big')
  // the app's side closes after anything forwarded on it
  await until(() => appSide(c.path)?.closed !== undefined, 2000, 'the app connection closed too')
  t.strictSame(appMessages(c.path), ['a'.repeat(1024)], 'only the message at the limit reached the app')
  t.equal(await metric(g, M.closes('message_too_big')) - before, 1, 'close reason message_too_big')
  await until(() => g.gw.ws.open === 0, 2000, 'session gone')
})

t.test('WS_IDLE_TIMEOUT: traffic keeps a connection, silence closes it with 1000 "idle timeout"', async (t) => {
  const g = await gateway(t, { WS_IDLE_TIMEOUT: '1s' })
  const before = await metric(g, M.closes('idle_timeout'))
  const c = await connect(g, await issuer.token({ sub: randomSub('idle') }))
  for (let i = 0; i < 7; i++) {
    // time-based by nature: gaps shorter than the 1 s idle timeout, ~2 s in all
    await sleep(300)
    await echo(c, `keepalive ${i}`)
  }
  t.equal(c.ws.readyState, WebSocket.OPEN, 'open after ~2 s of traffic')
  const quiet = Date.now()
  const closed = await within(c.closed, 5000, 'idle close')
  t.equal(closed.code, 1000)
  t.equal(closed.reason, 'idle timeout')
  const after = closed.at - quiet
  t.ok(after >= 900 && after <= 2500, `closed ${after} ms after the last message`)
  t.equal(await metric(g, M.closes('idle_timeout')) - before, 1)
})

t.test('WS_PING_INTERVAL: a client that never answers pings is disconnected, one that does stays', async (t) => {
  const g = await gateway(t, { WS_PING_INTERVAL: '1s' })
  const before = await metric(g, M.closes('ping_timeout'))
  const [muteToken, politeToken] = await Promise.all([issuer.token({ sub: randomSub('mute') }), issuer.token({ sub: randomSub('polite') })])
  const silent = await connect(g, muteToken, { ws: { autoPong: false } })
  const start = Date.now()
  let pings = 0
  silent.ws.on('ping', () => { pings++ })
  const polite = await connect(g, politeToken)
  const closed = await within(silent.closed, 5000, 'ping timeout')
  const after = closed.at - start
  t.ok(after <= 3000, `disconnected ${after} ms after connecting`)
  t.ok(pings >= 1, `it was pinged (${pings})`)
  t.equal(closed.code, 1001)
  t.equal(closed.reason, 'ping timeout')
  t.equal(await metric(g, M.closes('ping_timeout')) - before, 1)
  // time-based by nature ("nothing happens within 3.5 s"): several 1 s ping rounds, each of which a mute client fails
  await sleep(Math.max(0, start + 3500 - Date.now()))
  t.equal(polite.ws.readyState, WebSocket.OPEN, 'a client answering pings is still connected after 3.5 s')
  await echo(polite, 'alive')
  polite.ws.close()
})

// --- backpressure -------------------------------------------------------------------------------------------------------------

interface App { url: string, socket (path: string): WebSocket | undefined, close (): Promise<void> }

/** A bare app whose WebSocket side the test drives directly (to flood, or to stop reading). */
async function startBareApp (): Promise<App> {
  const server = http.createServer((_req, res) => res.end())
  const wss = new WebSocketServer({ server, perMessageDeflate: false })
  const byPath = new Map<string, WebSocket>()
  wss.on('connection', (ws, req) => {
    byPath.set(req.url ?? '/', ws)
    ws.on('error', () => {})
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    socket: (path) => byPath.get(path),
    close: async () => {
      for (const ws of wss.clients) ws.terminate()
      await new Promise<void>((resolve) => wss.close(() => resolve()))
      server.closeAllConnections()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }
}

interface Pump { acked (): number, sent (): number, start (): void }

/** Sends `total` bytes in numbered chunks, keeping at most `window` bytes queued in `ws`; acked = write completed. */
function pump (ws: WebSocket, total: number, chunk: number, window: number): Pump {
  let sent = 0
  let acked = 0
  let seq = 0
  const go = (): void => {
    while (sent < total && ws.bufferedAmount < window && ws.readyState === WebSocket.OPEN) {
      const buf = Buffer.alloc(chunk)
      buf.writeUInt32BE(seq++, 0)
      sent += chunk
      ws.send(buf, { binary: true }, (err) => {
        if (err == null) acked += chunk
        go()
      })
    }
  }
  return { acked: () => acked, sent: () => sent, start: go }
}

/** Resolves once `progress` has not moved for `quietMs` (time-based by nature: a stall is the absence of progress). */
async function stalled (progress: () => number, quietMs: number, ms: number): Promise<number> {
  const end = Date.now() + ms
  let last = progress()
  let since = Date.now()
  while (Date.now() < end) {
    await sleep(50)
    const now = progress()
    if (now !== last) { last = now; since = Date.now() } else if (Date.now() - since >= quietMs) return now
  }
  throw new Error(`still progressing after ${ms} ms (${last} bytes)`)
}

/** Counts bytes of numbered chunks and checks they come in order. */
function receiver (): { bytes (): number, inOrder (): boolean, onData (d: Buffer): void } {
  let bytes = 0
  let next = 0
  let ordered = true
  return {
    bytes: () => bytes,
    inOrder: () => ordered,
    onData: (d) => {
      if (d.readUInt32BE(0) !== next++) ordered = false
      bytes += d.length
    }
  }
}

t.test('bounded buffers both ways (WS_MAX_BUFFERED=64 KiB)', async (t) => {
  const app = await startBareApp()
  t.teardown(() => app.close())
  const g = await gateway(t, { WS_MAX_BUFFERED: '65536', WS_MESSAGE_LIMIT_MAX: '100000' }, { upstreamUrl: app.url })
  const TOTAL = 64 * MiB
  const CHUNK = 256 * KiB // a quarter of the default WS_MAX_PAYLOAD
  const WINDOW = 1 * MiB

  t.test('a client that stops reading: the gateway stops pulling from the app, its memory stays flat', async (t) => {
    const c = await connect(g, await issuer.token({ sub: randomSub('slowreader') }), { collect: false })
    await until(() => app.socket(c.path) !== undefined, 2000, 'app side connected')
    const appWs = app.socket(c.path) as WebSocket
    c.ws.pause() // the client's socket is no longer read: the kernel buffers fill, then the gateway's send buffer
    const m0 = await memory()
    const p = pump(appWs, TOTAL, CHUNK, WINDOW)
    p.start()
    const acked = await stalled(p.acked, 1000, 30_000)
    const grown = await memory() - m0
    t.ok(acked < TOTAL / 2, `the app's writes stopped completing after ${(acked / MiB).toFixed(1)} MiB of ${TOTAL / MiB} MiB`)
    t.ok(appWs.bufferedAmount > 0, `the app's socket holds unsent data (${appWs.bufferedAmount} bytes): the gateway stopped reading`)
    t.ok(grown < 6 * MiB, `gateway process memory grew by ${(grown / MiB).toFixed(2)} MiB (heap + array buffers)`)
    t.equal(g.gw.ws.open, 1, 'the session is alive, just paused')

    const r = receiver()
    c.ws.on('message', (d) => r.onData(d as Buffer))
    c.ws.resume()
    await until(() => r.bytes() === TOTAL, 30_000, 'everything delivered once the client reads')
    t.ok(r.inOrder(), 'in order, nothing lost')
    await until(() => p.acked() === TOTAL, 5000, 'all app writes completed')
    c.ws.close()
  })

  t.test('an app that stops reading: the gateway stops pulling from the client, its memory stays flat', async (t) => {
    const c = await connect(g, await issuer.token({ sub: randomSub('slowapp') }), { collect: false })
    await until(() => app.socket(c.path) !== undefined, 2000, 'app side connected')
    const appWs = app.socket(c.path) as WebSocket
    const r = receiver()
    appWs.on('message', (d) => r.onData(d as Buffer))
    appWs.pause()
    const m0 = await memory()
    const p = pump(c.ws, TOTAL, CHUNK, WINDOW)
    p.start()
    const acked = await stalled(p.acked, 1000, 30_000)
    const grown = await memory() - m0
    t.ok(acked < TOTAL / 2, `the client's writes stopped completing after ${(acked / MiB).toFixed(1)} MiB of ${TOTAL / MiB} MiB`)
    t.ok(c.ws.bufferedAmount > 0, 'the client holds unsent data: the gateway stopped reading it')
    t.ok(grown < 6 * MiB, `gateway process memory grew by ${(grown / MiB).toFixed(2)} MiB (heap + array buffers); ` +
      'bounded by WS_MAX_BUFFERED plus a message, not by the pending-message count')

    appWs.resume()
    await until(() => r.bytes() === TOTAL, 30_000, 'everything delivered once the app reads')
    t.ok(r.inOrder(), 'in order, nothing lost')
    c.ws.close()
  })
})

// --- shutdown ---------------------------------------------------------------------------------------------------------------

t.test('shutdown (in-process close): readiness has failed before WebSockets get 1001', async (t) => {
  const g = await gateway(t)
  const c = await connect(g, await issuer.token({ sub: randomSub('shutdown') }))
  await echo(c, 'before')
  t.equal((await fetch(`${g.adminUrl}/readyz`)).status, 200)
  let drainingAtClose: boolean | undefined
  c.ws.once('close', () => { drainingAtClose = g.gw.readiness.draining })
  const closing = g.close()
  const closed = await within(c.closed, 5000, 'close')
  t.equal(closed.code, 1001)
  t.equal(drainingAtClose, true, 'readiness was already failing when the client saw 1001')
  await closing
  t.equal(await metric(g, M.closes('shutdown')), 1, 'close reason shutdown')
})

t.test('SIGTERM on the real entrypoint: /readyz 503 first, WebSockets keep working during SHUTDOWN_DELAY, then 1001', async (t) => {
  // src/server.ts through the same TypeScript loader tap uses: the code under test, no build step.
  const p = spawnGateway(t, { ...baseEnv(issuer, upstream), SHUTDOWN_DELAY: '1s', SHUTDOWN_TIMEOUT: '10s' }, { entry: 'src' })
  const proc = await p.listening(20_000)
  await untilReady(proc, 20_000, 'the process got ready')

  const c = await connect(proc, await issuer.token({ sub: randomSub('sigterm') }))
  await echo(c, 'before')
  const signalled = Date.now()
  p.child.kill('SIGTERM')
  let notReadyAt: number | undefined
  await until(async () => {
    if ((await readyz(proc).catch(() => undefined))?.status === 503) notReadyAt = Date.now()
    return notReadyAt !== undefined
  }, 2000, '/readyz 503')
  t.ok(notReadyAt !== undefined)
  t.equal(c.ws.readyState, WebSocket.OPEN, 'the WebSocket is still open while readiness fails')
  await echo(c, 'during the delay')
  t.ok(appMessages(c.path).includes('during the delay'), 'and still carries messages during SHUTDOWN_DELAY: the app received the message the client got back')
  const closed = await within(c.closed, 5000, '1001 after the delay')
  t.equal(closed.code, 1001, 'closed with 1001 going away')
  t.ok(closed.at > (notReadyAt ?? Infinity), `1001 came ${closed.at - (notReadyAt ?? 0)} ms after /readyz failed`)
  t.ok(closed.at - signalled >= 900, `after SHUTDOWN_DELAY (${closed.at - signalled} ms after SIGTERM)`)
  const { code } = await within(p.exited, 10_000, 'exit')
  t.equal(code, 0, 'exit 0')
})
