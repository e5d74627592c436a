// What was authorised is what the app receives (issue 10 item 1): raw request targets, written byte for byte on a
// socket, against a public path, role rules and a route limit. Each row asserts the gateway's status and the exact raw
// target the app saw (or that it saw nothing). Then the WebSocket side: the same canonical target for upgrades, and
// upgrades the bridge must refuse before a connection slot is taken (and never leak one).
import { randomBytes } from 'node:crypto'
import net from 'node:net'
import t, { type Test } from 'tap'
import { randomSub } from './helpers/issuer.js'
import { startBackends, startGateway } from './helpers/gateway.js'
import { until } from './helpers/wait.js'

const YAML = `
auth:
  publicPaths: ['/api/resonance/health']
  routes:
    - path: /api/resonance/premium/**
      roles: [premium]
    - path: /api/resonance/admin/**
      methods: [GET, POST, PUT, DELETE]
      roles: [admin]
    - path: /ws/admin/**
      roles: [admin]
rateLimit:
  max: 1000
  routes:
    - path: /api/resonance/search
      max: 1
      window: 60s
`

const { issuer, upstream } = await startBackends(t)
const g = await startGateway(t, issuer, upstream, { yaml: YAML, env: { WS_MAX_CONNECTIONS_PER_USER: '2' } })

interface RawAnswer { status: number, head: string }

/** Writes one request exactly as given (no client library normalises the target) and reads the status line. */
function rawRequest (method: string, target: string, headers: Record<string, string> = {}): Promise<RawAnswer> {
  const { port } = new URL(g.url)
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(port), '127.0.0.1')
    let data = ''
    socket.setEncoding('latin1')
    socket.on('data', (c: string) => {
      data += c
      const end = data.indexOf('\r\n\r\n')
      if (end === -1) return
      socket.destroy()
      resolve({ status: Number(/^HTTP\/1\.1 (\d{3})/.exec(data)?.[1] ?? 0), head: data.slice(0, end) })
    })
    socket.on('error', reject)
    socket.on('close', () => { if (!data.includes('\r\n\r\n')) resolve({ status: 0, head: data }) })
    const lines = [`${method} ${target} HTTP/1.1`, 'Host: 127.0.0.1', 'Connection: close']
    for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`)
    socket.write(lines.join('\r\n') + '\r\n\r\n', 'latin1')
  })
}

function wsHandshake (target: string, token: string | undefined, extra: Record<string, string> = {}): Record<string, string> {
  return {
    Upgrade: 'websocket',
    Connection: 'Upgrade',
    'Sec-WebSocket-Key': randomBytes(16).toString('base64'),
    'Sec-WebSocket-Version': '13',
    ...(token !== undefined ? { Authorization: `Bearer ${token}` } : {}),
    ...extra
  }
}

type Who = 'none' | 'user' | 'premium' | 'admin'
/** method, raw target, caller, expected status, exact target the app must have seen (null: nothing reached it). */
type Row = [string, string, Who, number, string | null]

const PUBLIC: Row[] = [
  ['GET', '/api/resonance/health', 'none', 200, '/api/resonance/health'],
  ['GET', '/api/resonance/health?probe=1', 'none', 200, '/api/resonance/health?probe=1'],
  ['GET', '/api/resonance/%68ealth', 'none', 200, '/api/resonance/health'],
  ['GET', '/api/resonance/%68%65%61%6c%74%68', 'none', 200, '/api/resonance/health'],
  ['GET', '/api/resonance//health', 'none', 200, '/api/resonance/health'],
  ['GET', '//api/resonance/health', 'none', 200, '/api/resonance/health'],
  ['GET', '/api/resonance/x/../health', 'none', 200, '/api/resonance/health'],
  ['GET', '/api/resonance/./health', 'none', 200, '/api/resonance/health'],
  ['GET', '/api/x/%2e%2e/resonance/health', 'none', 200, '/api/resonance/health'],
  ['HEAD', '/api/resonance/health', 'none', 200, '/api/resonance/health'],
  // other spellings the app could route elsewhere need a token
  ['GET', '/api/resonance/health/', 'none', 401, null],
  ['GET', '/api/resonance/health/.', 'none', 401, null],
  ['GET', '/API/resonance/health', 'none', 401, null],
  ['GET', '/api/resonance/HEALTH', 'none', 401, null],
  ['GET', '/api/resonance/health;x', 'none', 401, null],
  ['GET', '/api/resonance/healthz', 'none', 401, null],
  ['GET', '/api/resonance/health/x', 'none', 401, null],
  // ...and with a token they reach the app as exactly that canonical path
  ['GET', '/api/resonance/health/.', 'user', 200, '/api/resonance/health/'],
  ['GET', '/api/resonance/HEALTH', 'user', 200, '/api/resonance/HEALTH'],
  // refused outright: a fragment, encoded separators, NUL, a backslash, escaping the root, not origin-form
  ['GET', '/api/resonance/health#', 'none', 400, null],
  ['GET', '/api/resonance/health#x', 'none', 400, null],
  ['GET', '/api/resonance/health%2f', 'none', 400, null],
  ['GET', '/api/resonance/health%2F..', 'none', 400, null],
  ['GET', '/api/resonance/health%5c', 'none', 400, null],
  ['GET', '/api/resonance/health\\', 'none', 400, null],
  ['GET', '/api/resonance/health%00', 'none', 400, null],
  ['GET', '/../api/resonance/health', 'none', 400, null],
  ['GET', '/api/resonance/health%zz', 'none', 400, null],
  ['GET', 'http://127.0.0.1/api/resonance/health', 'none', 400, null],
  ['OPTIONS', '*', 'none', 400, null]
]

const ROLES: Row[] = [
  ['GET', '/api/resonance/premium', 'user', 403, null],
  ['GET', '/api/resonance/premium/x', 'user', 403, null],
  ['GET', '/api/resonance/premium#', 'user', 400, null],
  ['GET', '/api/resonance/premium/#x', 'user', 400, null],
  ['GET', '/api/resonance/premium/', 'user', 403, null],
  ['GET', '/API/RESONANCE/PREMIUM', 'user', 403, null],
  ['GET', '/api/resonance/%70remium', 'user', 403, null],
  ['GET', '/api/resonance/%50REMIUM/x', 'user', 403, null],
  ['GET', '/api/resonance//premium', 'user', 403, null],
  ['GET', '/api/resonance/x/../premium', 'user', 403, null],
  ['GET', '/api/resonance/premium/./x', 'user', 403, null],
  ['GET', '/api/resonance/premium%2fx', 'user', 400, null],
  ['GET', '/api/resonance/premium..%2f', 'user', 400, null],
  ['GET', '/api/resonance/premium/..', 'user', 200, '/api/resonance/'],
  ['GET', '/api/resonance/premium;x', 'user', 200, '/api/resonance/premium;x'],
  ['GET', '/api/resonance/premiumx', 'user', 200, '/api/resonance/premiumx'],
  ['GET', '/api/resonance/premium', 'premium', 200, '/api/resonance/premium'],
  ['GET', '/api/resonance//premium/./x', 'premium', 200, '/api/resonance/premium/x'],
  ['POST', '/api/resonance/admin#?user=42&action=delete', 'user', 400, null],
  ['POST', '/api/resonance/admin?user=42&action=delete', 'user', 403, null],
  ['POST', '/api/resonance/Admin/?user=42', 'user', 403, null],
  ['HEAD', '/api/resonance/admin', 'user', 403, null],
  ['HEAD', '/api/resonance/admin/x', 'user', 403, null],
  ['PATCH', '/api/resonance/admin', 'user', 200, '/api/resonance/admin'],
  ['HEAD', '/api/resonance/admin', 'admin', 200, '/api/resonance/admin'],
  ['POST', '/api/resonance/admin?user=42', 'admin', 200, '/api/resonance/admin?user=42']
]

async function tokenFor (who: Who, sub: string): Promise<string | undefined> {
  if (who === 'none') return undefined
  const realmRoles = who === 'user' ? ['user'] : [who]
  return await issuer.token({ sub, realmRoles })
}

async function runRows (t: Test, rows: Row[]): Promise<void> {
  const tokens = new Map<Who, string | undefined>()
  for (const who of ['none', 'user', 'premium', 'admin'] as const) tokens.set(who, await tokenFor(who, randomSub(who)))
  for (const [method, target, who, status, appSaw] of rows) {
    upstream.reset()
    const token = tokens.get(who)
    const a = await rawRequest(method, target, token !== undefined ? { Authorization: `Bearer ${token}` } : {})
    const label = `${method} ${JSON.stringify(target)} as ${who}`
    t.equal(a.status, status, `${label}: ${status}`)
    if (appSaw === null) {
      t.equal(upstream.requests.length, 0, `${label}: the app saw nothing`)
    } else {
      await until(() => upstream.requests.length > 0, 5000, 'the app got the request')
      t.equal(upstream.requests[0]?.url, appSaw, `${label}: the app saw exactly ${appSaw}`)
      t.equal(upstream.requests[0]?.method, method, `${label}: with its method`)
    }
  }
}

t.test('a public path: only its canonical spellings pass without a token, and the app gets the canonical one', (t) => runRows(t, PUBLIC))

t.test('role rules: no spelling of a protected path passes without the role; HEAD is GET', (t) => runRows(t, ROLES))

t.test('a route limit: no spelling of the route gets a fresh budget', async (t) => {
  const sub = randomSub('searcher')
  const token = await issuer.token({ sub })
  const auth = { Authorization: `Bearer ${token}` }
  upstream.reset()
  t.equal((await rawRequest('GET', '/api/resonance/search?q=0', auth)).status, 200, 'the one allowed search')
  t.equal(upstream.requests[0]?.url, '/api/resonance/search?q=0')
  const variants: Array<[string, string, number]> = [
    ['GET', '/api/resonance/search?q=1', 429],
    ['GET', '/api/resonance/search#?q=2', 400],
    ['GET', '/api/resonance/search/?q=3', 429],
    ['GET', '/API/Resonance/Search?q=4', 429],
    ['GET', '/api/resonance/%73earch?q=5', 429],
    ['GET', '/api/resonance//search?q=6', 429],
    ['GET', '/api/resonance/x/../search?q=7', 429],
    ['GET', '/api/resonance/search/.?q=8', 429],
    ['HEAD', '/api/resonance/search?q=9', 429],
    ['POST', '/api/resonance/search?q=10', 429]
  ]
  upstream.reset()
  for (const [method, target, status] of variants) {
    t.equal((await rawRequest(method, target, auth)).status, status, `${method} ${target}: ${status}`)
  }
  t.equal(upstream.requests.length, 0, 'none of them reached the app')
  const other = await rawRequest('GET', '/api/resonance/searches?q=x', auth)
  t.equal(other.status, 200, 'control: another path of the same user is not that route')
})

t.test('WebSocket upgrades: the same canonical target, refused spellings never reach the app', async (t) => {
  const user = await issuer.token({ sub: randomSub('wsuser'), realmRoles: ['user'] })
  const admin = await issuer.token({ sub: randomSub('wsadmin'), realmRoles: ['admin'] })
  const rows: Array<[string, string, number, string | null]> = [
    ['/ws/admin#', user, 400, null],
    ['/ws/admin/#x', user, 400, null],
    ['/ws/admin', user, 403, null],
    ['/ws/ADMIN/', user, 403, null],
    ['/ws//chat/../admin', user, 403, null],
    ['/ws/%61dmin', user, 403, null],
    ['/ws/admin%2f', user, 400, null],
    ['http://127.0.0.1/ws/chat', user, 400, null],
    ['/ws/chat\\..\\admin', user, 400, null],
    ['/ws//chat/./room', user, 101, '/ws/chat/room'],
    ['/ws/%63hat?x=1', user, 101, '/ws/chat?x=1'],
    ['/ws//admin/', admin, 101, '/ws/admin/']
  ]
  for (const [target, token, status, appSaw] of rows) {
    upstream.reset()
    const a = await rawRequest('GET', target, wsHandshake(target, token))
    t.equal(a.status, status, `upgrade ${target}: ${status}`)
    if (appSaw === null) {
      t.equal(upstream.wsConnections.length, 0, `upgrade ${target}: the app saw no WebSocket`)
      t.equal(upstream.requests.length, 0, `upgrade ${target}: nor a request`)
    } else {
      await until(() => upstream.wsConnections.length > 0, 5000, 'the app got the WebSocket')
      t.equal(upstream.wsConnections[0]?.url, appSaw, `upgrade ${target}: the app saw exactly ${appSaw}`)
    }
  }
  await until(() => g.gw.ws.open === 0, 5000, 'the test sockets are closed')
})

t.test('malformed upgrades of an authorised user: 400 before a slot is taken, so the user is never locked out', async (t) => {
  const sub = randomSub('slots')
  const token = await issuer.token({ sub })
  upstream.reset()
  const bad: Array<[string, Record<string, string>]> = [
    ['duplicated subprotocol', { 'Sec-WebSocket-Protocol': 'chat, chat' }],
    ['bearer token twice', { 'Sec-WebSocket-Protocol': `bearer, ${token}, ${token}`, Authorization: '' }],
    ['bad subprotocol token', { 'Sec-WebSocket-Protocol': 'chat, "v2"' }],
    ['bad key', { 'Sec-WebSocket-Key': 'short' }],
    ['bad version', { 'Sec-WebSocket-Version': '8' }],
    ['fragment', {}]
  ]
  // WS_MAX_CONNECTIONS_PER_USER=2: a leaked slot per failure would lock the user out after two.
  for (const [what, extra] of bad) {
    const headers = wsHandshake('/ws/chat', token, extra)
    if (headers.Authorization === '') delete headers.Authorization
    const a = await rawRequest('GET', what === 'fragment' ? '/ws/chat#' : '/ws/chat', headers)
    t.equal(a.status, 400, `${what}: 400`)
  }
  t.equal(upstream.wsConnections.length, 0, 'the app saw none of them')
  for (let i = 0; i < 2; i++) {
    const ok = await rawRequest('GET', '/ws/chat', wsHandshake('/ws/chat', token))
    t.equal(ok.status, 101, `then a well-formed upgrade ${i + 1}/2 of the same user opens: no slot was leaked`)
  }
  await until(() => g.gw.ws.open === 0, 5000, 'the test sockets are closed')
})

t.test('Upgrade: websocket without Connection: Upgrade is an ordinary request, never a WebSocket', async (t) => {
  const token = await issuer.token({ sub: randomSub('plain') })
  upstream.reset()
  const a = await rawRequest('GET', '/ws/chat', {
    Authorization: `Bearer ${token}`,
    Upgrade: 'websocket',
    'Sec-WebSocket-Key': randomBytes(16).toString('base64'),
    'Sec-WebSocket-Version': '13'
  })
  t.equal(a.status, 200, 'answered as HTTP by the app')
  t.equal(upstream.requests.length, 1, 'the app got a plain GET')
  t.equal(upstream.wsConnections.length, 0, 'and no WebSocket')
  t.equal(g.gw.ws.open, 0, 'no session (and no slot) in the gateway')
})
