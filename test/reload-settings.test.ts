// Every setting a reload claims to apply really applies (issue 11 item 5): one scenario per `live` setting of
// settings.ts and per YAML-only rule list, each observed on a running gateway before and after a reload; the set of
// scenarios must equal the set of live settings, so a setting cannot be declared live without a test of its effect.
// Restart-only settings are reported by a reload and keep their value in force.
import { writeFileSync } from 'node:fs'
import t, { type Test } from 'tap'
import WebSocket from 'ws'
import { randomSub, startIssuer, type TestIssuer } from './helpers/issuer.js'
import { startUpstream, type TestUpstream } from './helpers/upstream.js'
import { startGateway, writeYaml, type TestGateway } from './helpers/gateway.js'
import { until } from './helpers/wait.js'
import { LIVE_SETTINGS, RESTART_ONLY } from '../src/config/live.js'
import { STRUCTURED } from '../src/config/load.js'

let issuer: TestIssuer
let upstream: TestUpstream

t.before(async () => {
  issuer = await startIssuer()
  upstream = await startUpstream()
})
t.teardown(async () => {
  await upstream?.close()
  await issuer?.close()
})

interface Ctx { g: TestGateway, file: string, reload: (yaml: string) => void }

/** A gateway on its own YAML file (in-process limits), trusting 127.0.0.1 so each scenario can be its own client IP. */
async function gateway (t: Test, yaml: string): Promise<Ctx> {
  const file = writeYaml(yaml)
  // LOG_LEVEL empty: the YAML decides it (the environment would win over any file edit).
  const g = await startGateway(t, issuer, upstream, { env: { CONFIG_FILE: file, TRUST_PROXY: '127.0.0.1', LOG_LEVEL: '' } })
  return {
    g,
    file,
    reload: (next: string) => {
      writeFileSync(file, next)
      const r = g.gw.reload()
      t.same(r, { ok: true, restartNeeded: [] }, 'reloaded, nothing needs a restart')
    }
  }
}

async function get (g: TestGateway, path: string, token?: string, headers: Record<string, string> = {}): Promise<Response> {
  return await fetch(`${g.url}${path}`, { headers: { ...(token !== undefined ? { authorization: `Bearer ${token}` } : {}), ...headers } })
}

/** Opens a WebSocket for `token`; resolves with it, or with the refusal status. */
function upgrade (t: Test, g: TestGateway, token: string): Promise<{ ws?: WebSocket, status?: number }> {
  const ws = new WebSocket(`${g.wsUrl}/ws/x`, { headers: { authorization: `Bearer ${token}` } })
  t.teardown(() => ws.terminate())
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve({ ws }))
    ws.once('unexpected-response', (_req, res) => { res.resume(); ws.on('error', () => {}); resolve({ status: res.statusCode }) })
    ws.once('error', reject)
  })
}

/** Sends `n` messages one after the other; returns what came back: echoes, gateway notes, or the close code. */
async function send (ws: WebSocket, n: number): Promise<{ echoes: number, notes: Array<{ retry_after?: number }>, closed?: number }> {
  const out: { echoes: number, notes: Array<{ retry_after?: number }>, closed?: number } = { echoes: 0, notes: [] }
  ws.on('close', (code) => { out.closed = code })
  ws.on('message', (d) => {
    const text = String(d)
    if (text.startsWith('{')) out.notes.push(JSON.parse(text) as { retry_after?: number })
    else out.echoes++
  })
  for (let i = 0; i < n && out.closed === undefined; i++) {
    const before = out.echoes + out.notes.length
    ws.send(`m${i}`)
    await until(() => out.echoes + out.notes.length > before || out.closed !== undefined, 5000, `answer to message ${i}`)
  }
  return out
}

async function token (prefix: string, realmRoles: string[] = ['user']): Promise<string> {
  return await issuer.token({ sub: randomSub(prefix), realmRoles })
}

const BAD = 'eyJhbGciOiJSUzI1NiIsImtpZCI6Im5vcGUifQ.eyJzdWIiOiJ4In0.c2ln'

const SCENARIOS: Record<string, (t: Test) => Promise<void>> = {
  'log.level': async (t) => {
    const c = await gateway(t, 'log:\n  level: info\n')
    t.equal(c.g.gw.app.log.level, 'info')
    c.reload('log:\n  level: error\n')
    t.equal(c.g.gw.app.log.level, 'error', 'the logger level follows')
  },
  'rateLimit.max': async (t) => {
    const c = await gateway(t, 'rateLimit:\n  max: 2\n')
    const tok = await token('max')
    const codes = [(await get(c.g, '/a', tok)).status, (await get(c.g, '/a', tok)).status, (await get(c.g, '/a', tok)).status]
    t.same(codes, [200, 200, 429], 'budget 2')
    c.reload('rateLimit:\n  max: 4\n')
    t.equal((await get(c.g, '/a', tok)).status, 200, 'budget 4 in the same window')
  },
  'rateLimit.window': async (t) => {
    const c = await gateway(t, 'rateLimit:\n  window: 60s\n')
    const tok = await token('window')
    t.ok(Number((await get(c.g, '/a', tok)).headers.get('x-ratelimit-reset')) > 30, 'a 60 s window')
    c.reload('rateLimit:\n  window: 3s\n')
    t.ok(Number((await get(c.g, '/a', tok)).headers.get('x-ratelimit-reset')) <= 3, 'a 3 s window')
  },
  'rateLimit.authFailures.max': async (t) => {
    const c = await gateway(t, 'rateLimit:\n  authFailures:\n    max: 100\n')
    const from = { 'x-forwarded-for': '198.51.100.10' }
    for (let i = 0; i < 3; i++) t.equal((await get(c.g, '/a', BAD, from)).status, 401)
    c.reload('rateLimit:\n  authFailures:\n    max: 2\n')
    await until(async () => (await get(c.g, '/a', BAD, from)).status === 429, 5000, 'blocked under the new limit')
  },
  'rateLimit.authFailures.window': async (t) => {
    const c = await gateway(t, 'rateLimit:\n  authFailures:\n    max: 1\n    window: 60s\n')
    const blockedFor = async (ip: string): Promise<number> => {
      let r: Response | undefined
      await until(async () => { r = await get(c.g, '/a', BAD, { 'x-forwarded-for': ip }); return r.status === 429 }, 5000, `${ip} blocked`)
      return Number(r?.headers.get('retry-after'))
    }
    t.ok(await blockedFor('198.51.100.20') > 30, 'blocked for about a minute')
    c.reload('rateLimit:\n  authFailures:\n    max: 1\n    window: 3s\n')
    t.ok(await blockedFor('198.51.100.21') <= 3, 'a new block lasts the new window')
  },
  'ws.messageLimit.max': async (t) => {
    const c = await gateway(t, 'ws:\n  messageLimit:\n    max: 2\n')
    const a = await upgrade(t, c.g, await token('wsmax'))
    t.equal((await send(a.ws as WebSocket, 3)).closed, 1008, 'the 3rd message closes the connection')
    c.reload('ws:\n  messageLimit:\n    max: 5\n')
    const b = await upgrade(t, c.g, await token('wsmax'))
    const r = await send(b.ws as WebSocket, 3)
    t.equal(r.echoes, 3, 'a new user gets 3 messages through')
    t.equal(r.closed, undefined)
  },
  'ws.messageLimit.window': async (t) => {
    const c = await gateway(t, 'ws:\n  messageLimit:\n    max: 1\n    window: 60s\n    action: drop\n')
    const a = await send((await upgrade(t, c.g, await token('wswin'))).ws as WebSocket, 2)
    t.ok((a.notes[0]?.retry_after ?? 0) > 30, 'dropped, retry after about a minute')
    c.reload('ws:\n  messageLimit:\n    max: 1\n    window: 3s\n    action: drop\n')
    const b = await send((await upgrade(t, c.g, await token('wswin'))).ws as WebSocket, 2)
    t.ok((b.notes[0]?.retry_after ?? 99) <= 3, 'dropped, retry after the new window')
  },
  'ws.messageLimit.action': async (t) => {
    const c = await gateway(t, 'ws:\n  messageLimit:\n    max: 1\n    action: close\n')
    t.equal((await send((await upgrade(t, c.g, await token('wsact'))).ws as WebSocket, 2)).closed, 1008, 'close')
    c.reload('ws:\n  messageLimit:\n    max: 1\n    action: drop\n')
    const r = await send((await upgrade(t, c.g, await token('wsact'))).ws as WebSocket, 2)
    t.equal(r.closed, undefined, 'drop keeps the connection')
    t.equal(r.notes.length, 1, 'and says the message was dropped')
  },
  'ws.maxConnectionsPerUser': async (t) => {
    const c = await gateway(t, 'ws:\n  maxConnectionsPerUser: 1\n')
    const tok = await token('wsconn')
    t.ok((await upgrade(t, c.g, tok)).ws, 'first connection')
    t.equal((await upgrade(t, c.g, tok)).status, 429, 'second refused')
    c.reload('ws:\n  maxConnectionsPerUser: 2\n')
    t.ok((await upgrade(t, c.g, tok)).ws, 'second connection opens under the new cap')
  },
  'auth.publicPaths': async (t) => {
    const c = await gateway(t, 'auth:\n  publicPaths: []\n')
    t.equal((await get(c.g, '/pub')).status, 401)
    c.reload('auth:\n  publicPaths: [/pub]\n')
    t.equal((await get(c.g, '/pub')).status, 200)
  },
  'auth.routes': async (t) => {
    const c = await gateway(t, 'auth:\n  routes: []\n')
    const tok = await token('routes')
    t.equal((await get(c.g, '/adm', tok)).status, 200)
    c.reload('auth:\n  routes:\n    - path: /adm\n      roles: [admin]\n')
    t.equal((await get(c.g, '/adm', tok)).status, 403)
  },
  'rateLimit.routes': async (t) => {
    const c = await gateway(t, 'rateLimit:\n  routes: []\n')
    const tok = await token('rroutes')
    for (let i = 0; i < 3; i++) t.equal((await get(c.g, '/r', tok)).status, 200)
    c.reload('rateLimit:\n  routes:\n    - path: /r\n      max: 1\n')
    t.same([(await get(c.g, '/r', tok)).status, (await get(c.g, '/r', tok)).status], [200, 429], 'the new route budget')
  },
  'rateLimit.roles': async (t) => {
    const c = await gateway(t, 'rateLimit:\n  max: 5\n  roles: []\n')
    const tok = await token('rroles', ['premium'])
    t.equal((await get(c.g, '/a', tok)).headers.get('x-ratelimit-limit'), '5')
    c.reload('rateLimit:\n  max: 5\n  roles:\n    - role: premium\n      max: 1000\n')
    t.equal((await get(c.g, '/a', tok)).headers.get('x-ratelimit-limit'), '1000', 'the role budget applies')
  },
  'rateLimit.exempt': async (t) => {
    const c = await gateway(t, 'rateLimit:\n  exempt:\n    roles: []\n')
    const tok = await token('exempt', ['svc'])
    t.equal((await get(c.g, '/a', tok)).headers.get('x-ratelimit-limit'), '100')
    c.reload('rateLimit:\n  exempt:\n    roles: [svc]\n')
    t.equal((await get(c.g, '/a', tok)).headers.get('x-ratelimit-limit'), null, 'exempt: no limit at all')
  }
}

t.test('every live setting has a scenario here, and nothing else claims to be live', async (t) => {
  t.same(Object.keys(SCENARIOS).sort(), [...LIVE_SETTINGS, ...STRUCTURED].sort())
})

for (const [name, scenario] of Object.entries(SCENARIOS)) t.test(`reload applies ${name}`, scenario)

t.test('restart-only settings: a reload names them and keeps the values in force', async (t) => {
  const changes: Array<[string, string, string, (g: TestGateway) => unknown, unknown]> = [
    // the three a reload used to report as applied while the code kept the start value
    ['auth.revocationMinTtl', 'auth:\n  revocationMinTtl: 2h\n', 'auth:\n  revocationMinTtl: 3h\n', (g) => g.gw.live.current.auth.revocationMinTtlMs, 7_200_000],
    ['ws.maxBuffered', 'ws:\n  maxBuffered: 65536\n', 'ws:\n  maxBuffered: 131072\n', (g) => g.gw.live.current.ws.maxBuffered, 65_536],
    ['rateLimit.fallbackMax', 'rateLimit:\n  fallbackMax: 5\n', 'rateLimit:\n  fallbackMax: 50\n', (g) => g.gw.live.current.rateLimit.fallbackMax, 5],
    ['ws.pingInterval', 'ws:\n  pingInterval: 20s\n', 'ws:\n  pingInterval: 40s\n', (g) => g.gw.live.current.ws.pingIntervalMs, 20_000],
    ['upstream.timeout', 'upstream:\n  timeout: 10s\n', 'upstream:\n  timeout: 20s\n', (g) => g.gw.live.current.upstream.timeoutMs, 10_000]
  ]
  for (const [path, before, after, read, kept] of changes) {
    t.ok(RESTART_ONLY.includes(path as never), `${path} is declared restart-only`)
    const file = writeYaml(before)
    const g = await startGateway(t, issuer, upstream, { env: { CONFIG_FILE: file, LOG_LEVEL: '' } })
    writeFileSync(file, `${after}log:\n  level: warn\n`)
    const r = g.gw.reload()
    t.same(r, { ok: true, restartNeeded: [path] }, `${path}: reported as needing a restart`)
    t.equal(read(g), kept, `${path}: the value in force is kept`)
    t.equal(g.gw.app.log.level, 'warn', `${path}: the live part of the same reload applied`)
    await g.close()
  }
})
