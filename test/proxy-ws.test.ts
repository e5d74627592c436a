// WebSocket pass-through on real sockets: authenticated upgrade, messages both ways, subprotocol negotiation with
// the token entry removed, close propagation, upstream refusal before any 101, and the upgrade-socket crash guard.
import { createServer, type IncomingMessage } from 'node:http'
import { connect, type AddressInfo, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import WebSocket from 'ws'
import { startBackends, startGateway } from './helpers/gateway.js'
import { freePort } from './helpers/ports.js'
import { until } from './helpers/wait.js'

function opened (ws: WebSocket): Promise<void> {
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve())
    ws.once('error', reject)
    ws.once('unexpected-response', (_req, res) => reject(new Error(`unexpected ${res.statusCode}`)))
  })
}

function refused (ws: WebSocket): Promise<number> {
  return new Promise((resolve, reject) => {
    ws.once('open', () => reject(new Error('upgrade was accepted')))
    ws.once('unexpected-response', (_req, res: IncomingMessage) => { res.resume(); resolve(res.statusCode ?? 0) })
    ws.once('error', () => {})
  })
}

function nextMessage (ws: WebSocket): Promise<{ data: Buffer, binary: boolean }> {
  return new Promise((resolve) => ws.once('message', (data, binary) => resolve({ data: data as Buffer, binary })))
}

function closed (ws: WebSocket): Promise<{ code: number, reason: string }> {
  return new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })))
}

t.test('WebSocket proxying', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream)
  const token = await issuer.token({ sub: 'wsuser', realmRoles: ['user'], username: 'ws.user' })

  t.beforeEach(() => upstream.reset())

  t.test('messages flow both ways, text and binary, in order; identity reaches the app', async (t) => {
    const ws = new WebSocket(`${g.wsUrl}/ws/resonance?room=1`, { headers: { authorization: `Bearer ${token}`, 'x-user-sub': 'admin' } })
    await opened(ws)
    const replies: string[] = []
    ws.on('message', (d) => replies.push(d.toString()))
    for (let i = 0; i < 50; i++) ws.send(`m${i}`)
    await until(() => replies.length === 50, 3000, 'all 50 echoes back')
    t.same(replies, Array.from({ length: 50 }, (_, i) => `m${i}`), 'echoes come back in order')
    ws.removeAllListeners('message')
    ws.send(Buffer.from([0, 1, 2, 255]), { binary: true })
    const bin = await nextMessage(ws)
    t.ok(bin.binary)
    t.same([...bin.data], [0, 1, 2, 255])

    const rec = upstream.wsConnections[0]
    t.equal(rec?.url, '/ws/resonance?room=1')
    t.equal(rec?.headers['x-user-sub'], 'wsuser', 'verified identity injected, client spoof stripped')
    t.equal(rec?.headers['x-user-name'], 'ws.user')
    t.equal(rec?.headers.authorization, undefined, 'token not forwarded')
    t.equal(rec?.messages.length, 51)
    ws.close(1000, 'bye')
    await until(() => rec?.closed !== undefined, 3000, 'the app saw the close')
    t.same(rec?.closed, { code: 1000, reason: 'bye' }, 'client close code reaches the app')
  })

  t.test('token in the query: stripped before the app', async (t) => {
    const ws = new WebSocket(`${g.wsUrl}/ws/resonance?a=1&access_token=${token}`)
    await opened(ws)
    await until(() => upstream.wsConnections.length === 1, 3000, 'the app has one connection')
    t.equal(upstream.wsConnections[0]?.url, '/ws/resonance?a=1')
    ws.close()
  })

  t.test('token in Sec-WebSocket-Protocol: removed, app protocol negotiated', async (t) => {
    const ws = new WebSocket(`${g.wsUrl}/ws/resonance`, ['bearer', token, 'resonance.v1'])
    await opened(ws)
    t.equal(ws.protocol, 'resonance.v1', 'the client gets the app\'s choice')
    await until(() => upstream.wsConnections.length === 1, 3000, 'the app has one connection')
    const rec = upstream.wsConnections[0]
    t.equal(rec?.headers['sec-websocket-protocol'], 'resonance.v1', 'the app never sees the token or the marker')
    t.equal(rec?.protocol, 'resonance.v1')
    ws.close()

    const only = new WebSocket(`${g.wsUrl}/ws/resonance`, ['bearer', token])
    await opened(only)
    t.equal(only.protocol, 'bearer', 'with no app protocol the gateway answers "bearer" so browsers accept the 101')
    await until(() => upstream.wsConnections.length === 2, 3000, 'the app has two connections')
    t.equal(upstream.wsConnections[1]?.headers['sec-websocket-protocol'], undefined)
    only.close()
  })

  t.test('the app closing is propagated with its code', async (t) => {
    const ws = new WebSocket(`${g.wsUrl}/ws/resonance`, { headers: { authorization: `Bearer ${token}` } })
    await opened(ws)
    const done = closed(ws)
    ws.send('close:4001:app says bye')
    t.same(await done, { code: 4001, reason: 'app says bye' })
  })

  t.test('refused upgrades get an HTTP status and no 101; the app sees nothing', async (t) => {
    t.equal(await refused(new WebSocket(`${g.wsUrl}/ws/resonance`)), 401)
    t.equal(await refused(new WebSocket(`${g.wsUrl}/ws/resonance?access_token=a.b.c`)), 401)
    t.equal(upstream.wsConnections.length, 0)
    const audits = g.audits().filter((a) => a.transport === 'ws')
    t.ok(audits.length >= 2, 'audited with transport ws')
    t.equal(audits[0]?.path, '/ws/resonance')
  })

  t.test('metrics: open connections, messages by direction, closes by reason', async (t) => {
    const ws = new WebSocket(`${g.wsUrl}/ws/m`, { headers: { authorization: `Bearer ${token}` } })
    await opened(ws)
    ws.send('one')
    await nextMessage(ws)
    let text = await (await fetch(`${g.adminUrl}/metrics`)).text()
    t.match(text, /resonance_ws_connections 1\b/)
    t.match(text, /resonance_ws_messages_total\{direction="client_to_app"\} [1-9]/)
    t.match(text, /resonance_ws_messages_total\{direction="app_to_client"\} [1-9]/)
    ws.close()
    await until(() => g.gw.ws.open === 0, 3000, 'the gateway tracks no open WebSocket')
    text = await (await fetch(`${g.adminUrl}/metrics`)).text()
    t.match(text, /resonance_ws_connections 0\b/)
    t.match(text, /resonance_ws_closes_total\{reason="client_closed"\} [1-9]/)
  })

  t.test('shutdown closes WebSockets with 1001', async (t) => {
    const g2 = await startGateway(t, issuer, upstream)
    const ws = new WebSocket(`${g2.wsUrl}/ws/resonance`, { headers: { authorization: `Bearer ${token}` } })
    await opened(ws)
    const done = closed(ws)
    await g2.close()
    t.equal((await done).code, 1001)
  })
})

t.test('upstream WebSocket failures surface before the 101', async (t) => {
  const { issuer, upstream } = await startBackends(t)

  // An app that refuses every upgrade with 403, like an Express app with an origin check.
  const refusing = createServer((_req, res) => res.end('ok'))
  refusing.on('upgrade', (_req, socket: Socket) => {
    socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')
  })
  await new Promise<void>((resolve) => refusing.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise((resolve) => refusing.close(resolve)))
  const refusingUrl = `http://127.0.0.1:${(refusing.address() as AddressInfo).port}`

  const deadPort = await freePort()

  const token = await issuer.token()
  const headers = { authorization: `Bearer ${token}` }
  const r = await startGateway(t, issuer, upstream, { env: { UPSTREAM_URL: refusingUrl } })
  t.equal(await refused(new WebSocket(`${r.wsUrl}/ws/resonance`, { headers })), 403, 'the app\'s refusal is passed on')
  const d = await startGateway(t, issuer, upstream, { env: { UPSTREAM_URL: `http://127.0.0.1:${deadPort}` } })
  t.equal(await refused(new WebSocket(`${d.wsUrl}/ws/resonance`, { headers })), 502, 'app down: 502, no 101')
  const metrics = await (await fetch(`${d.adminUrl}/metrics`)).text()
  t.match(metrics, /resonance_upstream_errors_total\{kind="connect",transport="ws"\} 1/)
})

t.test('a client that resets its upgrade during pending auth does not crash the gateway', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  // Make auth slow: with no refetch interval a made-up kid forces a JWKS refetch, and the JWKS endpoint hangs.
  const g = await startGateway(t, issuer, upstream, { env: { JWKS_MIN_REFRESH_INTERVAL: '0', JWKS_FETCH_TIMEOUT: '1500ms' } })
  issuer.setJwksMode('hang')
  const { forgeToken, foreignRsaKey, claims } = await import('./helpers/forge.js')
  const { privateKey } = await foreignRsaKey()
  const port = Number(new URL(g.url).port)
  for (let i = 0; i < 20; i++) {
    const bogus = await forgeToken({ alg: 'RS256', key: privateKey, header: { kid: `made-up-${i}` }, payload: claims(issuer) })
    const socket = connect(port, '127.0.0.1')
    await new Promise<void>((resolve) => socket.once('connect', () => resolve()))
    socket.write(`GET /ws/resonance HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer ${bogus}\r\n\r\n`)
    // time-based by nature: give the request a moment to reach the gateway, then reset mid-authentication
    await sleep(5)
    socket.resetAndDestroy()
  }
  t.equal(g.gw.keys.ready, true)
  issuer.setJwksMode('ok')
  const res = await fetch(`${g.url}/api/resonance/x`, { headers: { authorization: `Bearer ${await issuer.token()}` } })
  t.equal(res.status, 200, 'still serving after 20 resets mid-auth')
})

t.test('messages the app sends right after the upgrade are not lost', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  // An app that greets in the same TCP chunk as its 101, as many servers do.
  const { WebSocketServer } = await import('ws')
  const greeter = createServer()
  const wss = new WebSocketServer({ server: greeter })
  wss.on('connection', (socket) => { for (let i = 0; i < 5; i++) socket.send(`greeting ${i}`) })
  await new Promise<void>((resolve) => greeter.listen(0, '127.0.0.1', resolve))
  t.teardown(() => { for (const c of wss.clients) c.terminate(); return new Promise((resolve) => greeter.close(resolve)) })
  const g = await startGateway(t, issuer, upstream, { env: { UPSTREAM_URL: `http://127.0.0.1:${(greeter.address() as AddressInfo).port}` } })
  const headers = { authorization: `Bearer ${await issuer.token()}` }
  for (let round = 0; round < 20; round++) {
    const ws = new WebSocket(`${g.wsUrl}/ws/resonance`, { headers })
    const got: string[] = []
    ws.on('message', (d) => got.push(String(d)))
    await opened(ws)
    await until(() => got.length === 5, 3000, 'all 5 messages received')
    t.same(got, ['greeting 0', 'greeting 1', 'greeting 2', 'greeting 3', 'greeting 4'], `round ${round}: all greetings, in order`)
    ws.close()
  }
})
