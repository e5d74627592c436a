// The audit trail (README, Operations > Logs) through real sockets and the real entrypoint:
//   - it is written whatever LOG_LEVEL says (error, silent), one JSON line per denial with the "log":"audit" marker and
//     the documented fields, and its lines add up exactly to the denial metrics, event by event;
//   - WebSocket message limit: `drop` writes one line per dropped message (action "drop", status 429, the connection
//     stays open) and the lines add up to resonance_rate_limit_triggered_total; `close` writes one (action "close", 1008);
//   - the admin API's lines (revoked, admin_denied) go to the audit trail, with one "component" key each;
//   - `node dist/server.js` with AUDIT_LOG=<file> and LOG_LEVEL=silent: after SIGTERM the file holds every denial made
//     before it; AUDIT_LOG=stderr; LOG_LEVEL=error still audits on stdout; an unwritable AUDIT_LOG exits 1 before binding;
//   - the README's Logs section names every field, event and reason value.
import { randomUUID } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import http from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import WebSocket from 'ws'
import { randomSub } from './helpers/issuer.js'
import { startBackends, startGateway, type TestGateway } from './helpers/gateway.js'
import { canBind } from './helpers/ports.js'
import { ensureBuilt, ROOT, spawnGateway, unreachableBackendsEnv } from './helpers/process.js'
import { connect } from './helpers/ws-client.js'
import { pingPong, scrapeMetric, until, within } from './helpers/wait.js'
import { AUTH_FAILURE_REASONS } from '../src/observability/metrics.js'
import { FORBIDDEN_REASONS, RATE_LIMITED_REASONS } from '../src/observability/audit.js'

const LOOPBACK = '127.0.0.1'
const ADMIN_TOKEN = 'audit-test-admin-token-0123456789'

const tmp = mkdtempSync(join(tmpdir(), 'gw-audit-'))
t.teardown(() => rmSync(tmp, { recursive: true, force: true }))
ensureBuilt()
const { issuer, upstream } = await startBackends(t)

type Line = Record<string, unknown>

/** Sum of every series of `name` in the gateway's registry (all label values). */
async function total (g: TestGateway, name: string): Promise<number> {
  const text = await g.gw.metrics.registry.metrics()
  return text.split('\n')
    .filter((l) => l.startsWith(`${name}{`) || l.startsWith(`${name} `))
    .reduce((sum, l) => sum + Number(l.slice(l.lastIndexOf(' ') + 1)), 0)
}

async function totals (g: TestGateway): Promise<Record<string, number>> {
  return {
    auth_failure: await total(g, 'resonance_auth_failures_total'),
    forbidden: await total(g, 'resonance_forbidden_total'),
    rate_limited: await total(g, 'resonance_rate_limit_triggered_total')
  }
}

/** Occurrences of `"key":` in a raw JSON line (a duplicate key is invisible once parsed). */
function keyCount (raw: string, key: string): number {
  return raw.split(`"${key}":`).length - 1
}

const EVENT_FIELDS = ['level', 'time', 'log', 'component', 'event', 'reason', 'ip', 'method', 'path', 'transport', 'status', 'reqId', 'msg']

t.test('the audit trail ignores LOG_LEVEL: one marked line per denial, adding up to the metrics', async (t) => {
  for (const level of ['error', 'silent']) {
    await t.test(`LOG_LEVEL=${level}`, async (t) => {
      const g = await startGateway(t, issuer, upstream, {
        env: { LOG_LEVEL: level, RATE_LIMIT_MAX: '1' },
        yaml: 'auth:\n  routes:\n    - path: /api/admin/**\n      roles: [admin]\n'
      })
      const before = await totals(g)
      const token = await issuer.token({ sub: randomSub('auditee') })
      const statuses = [
        (await fetch(`${g.url}/api/x?access_token=not-logged`)).status, // 401 missing_token (query token not accepted)
        (await fetch(`${g.url}/api/x`, { headers: { authorization: 'Bearer abc.def.ghi' } })).status, // 401 malformed
        (await fetch(`${g.url}/api/admin/x`, { headers: { authorization: `Bearer ${token}` } })).status, // 403 missing_role
        (await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${token}` } })).status, // 200
        (await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${token}` } })).status // 429 user_limit
      ]
      t.strictSame(statuses, [401, 401, 403, 200, 429])
      const after = await totals(g)

      t.equal(g.rawAudits.length, 4, 'four denials, four audit lines on the audit stream')
      const lines = g.rawAudits.map((l) => JSON.parse(l) as Line)
      t.strictSame(lines.map((l) => [l.event, l.reason, l.status]), [
        ['auth_failure', 'missing_token', 401],
        ['auth_failure', 'malformed', 401],
        ['forbidden', 'missing_role', 403],
        ['rate_limited', 'user_limit', 429]
      ])
      for (const [i, l] of lines.entries()) {
        for (const f of EVENT_FIELDS) t.ok(f in l, `line ${i}: ${f}`)
        t.match(l, { level: 40, log: 'audit', component: 'audit', msg: 'denied', transport: 'http', ip: LOOPBACK, method: 'GET' })
        t.equal(keyCount(g.rawAudits[i] as string, 'component'), 1, `line ${i}: one "component" key`)
        t.notMatch(g.rawAudits[i] as string, /access_token|not-logged|abc\.def\.ghi/, 'no query, no token')
      }
      t.equal(lines[2]?.sub, (lines[3] as Line).sub, 'sub when the token identified the caller')
      for (const event of ['auth_failure', 'forbidden', 'rate_limited']) {
        t.equal(lines.filter((l) => l.event === event).length, (after[event] as number) - (before[event] as number), `${event}: lines = metric delta`)
      }
      t.notOk(g.logs().some((l) => l.component !== 'audit' && l.level < 50), `the diagnostic log still follows LOG_LEVEL=${level}`)
    })
  }
})

t.test('README, Operations > Logs: every field, event and reason value of the audit schema', async (t) => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
  const logs = readme.slice(readme.indexOf('### Logs'), readme.indexOf('### Metrics'))
  const names = [
    ...EVENT_FIELDS, 'pid', 'hostname', 'sub', 'action', 'kind',
    'auth_failure', 'forbidden', 'rate_limited', 'revoked', 'admin_denied',
    ...AUTH_FAILURE_REASONS, ...FORBIDDEN_REASONS, ...RATE_LIMITED_REASONS,
    'AUDIT_LOG', '"log":"audit"'
  ]
  for (const n of names) t.ok(logs.includes(`\`${n}\``) || logs.includes(n.startsWith('"') ? n : `"${n}"`), n)
})

const WS_LIMITED = 'resonance_rate_limit_triggered_total'

t.test('WebSocket message limit, drop: one audit line per dropped message (action drop, 429), adding up to the metric', async (t) => {
  const g = await startGateway(t, issuer, upstream, {
    env: { WS_MESSAGE_LIMIT_MAX: '2', WS_MESSAGE_LIMIT_WINDOW: '60s', WS_MESSAGE_LIMIT_ACTION: 'drop' }
  })
  const sub = randomSub('dropper')
  const before = await total(g, WS_LIMITED)
  const c = await connect(g, await issuer.token({ sub }))
  const N = 7
  for (let i = 0; i < 2 + N; i++) c.ws.send(`m${i}`)
  await until(() => c.texts.filter((x) => x.startsWith('{')).length >= N, 5000, `${N} drop notices`)
  // every dropped message has had its notice; the pong orders after anything else the gateway sent meanwhile (a close)
  await pingPong(c.ws)
  t.equal(c.ws.readyState, WebSocket.OPEN, 'the connection stays open')
  const delta = (await total(g, WS_LIMITED)) - before
  t.equal(delta, N, 'metric: every dropped message')
  const lines = g.audits().filter((l) => l.reason === 'ws_message_limit' && l.sub === sub)
  t.equal(lines.length, N, 'audit: one line per dropped message')
  t.equal(lines.reduce((s, l) => s + (typeof l.count === 'number' ? l.count : 1), 0), delta, 'lines add up to the metric')
  for (const l of lines) t.match(l, { event: 'rate_limited', transport: 'ws', action: 'drop', status: 429, log: 'audit' })
  t.notOk(lines.some((l) => l.status === 1008), 'no line says 1008: nothing was closed')
  c.ws.close()
})

t.test('WebSocket message limit, close: one audit line (action close, 1008)', async (t) => {
  const g = await startGateway(t, issuer, upstream, {
    env: { WS_MESSAGE_LIMIT_MAX: '1', WS_MESSAGE_LIMIT_WINDOW: '60s', WS_MESSAGE_LIMIT_ACTION: 'close' }
  })
  const sub = randomSub('closer')
  const before = await total(g, WS_LIMITED)
  const c = await connect(g, await issuer.token({ sub }))
  c.ws.send('a')
  c.ws.send('b')
  t.equal((await within(c.closed, 5000, 'close')).code, 1008)
  // the app's side closes once the gateway has finished with the session
  await until(() => upstream.wsConnections.some((r) => r.url === c.path && r.closed !== undefined), 2000, 'the app connection closed too')
  const lines = g.audits().filter((l) => l.reason === 'ws_message_limit' && l.sub === sub)
  t.equal(lines.length, 1)
  t.match(lines[0], { event: 'rate_limited', transport: 'ws', action: 'close', status: 1008 })
  t.equal((await total(g, WS_LIMITED)) - before, 1, 'metric +1')
})

t.test('admin API lines (revoked, admin_denied) are on the audit trail with one "component" key', async (t) => {
  const g = await startGateway(t, issuer, upstream, { env: { ADMIN_TOKEN, LOG_LEVEL: 'silent' } })
  const post = async (auth: string): Promise<number> => (await fetch(`${g.adminUrl}/revocations`, {
    method: 'POST',
    headers: { authorization: `Bearer ${auth}`, 'content-type': 'application/json' },
    body: JSON.stringify({ sub: 'revoked-user' })
  })).status
  t.equal(await post(ADMIN_TOKEN), 201)
  t.equal(await post('wrong-admin-token-0123456789'), 401)
  const lines = g.rawAudits.map((l) => JSON.parse(l) as Line)
  t.match(lines, [
    { log: 'audit', component: 'audit', event: 'revoked', kind: 'sub', sub: 'revoked-user', ip: LOOPBACK, msg: 'token revocation' },
    { log: 'audit', component: 'audit', event: 'admin_denied', ip: LOOPBACK, path: '/revocations' }
  ])
  t.equal(lines.length, 2)
  for (const raw of g.rawAudits) t.equal(keyCount(raw, 'component'), 1, `one "component" key: ${raw}`)
  t.notOk(g.rawLogs.some((l) => l.includes(ADMIN_TOKEN) || l.includes('wrong-admin-token')), 'no admin token logged')
})

// --- the real entrypoint --------------------------------------------------------------------------------------------

/** Exit at once on SIGTERM (no readiness delay), within 5 s. */
const QUICK_EXIT = { SHUTDOWN_DELAY: '0', SHUTDOWN_TIMEOUT: '5s' }

const agent = new http.Agent({ keepAlive: true, maxSockets: 8 })
t.teardown(() => agent.destroy())

async function status (port: number, path: string, host = LOOPBACK): Promise<number> {
  return await new Promise((resolve, reject) => {
    http.get({ host, port, path, agent }, (res) => { res.resume(); res.on('end', () => resolve(res.statusCode ?? 0)) }).on('error', reject)
  })
}

async function listening (port: number): Promise<void> {
  await until(async () => await status(port, '/healthz').then(() => true, () => false), 15_000, 'admin port up')
}

/** `count` token-less requests (401 missing_token each), all at once. */
async function denials (port: number, count: number): Promise<void> {
  const s = await Promise.all(Array.from({ length: count }, async (_, i) => await status(port, `/api/d/${i}`)))
  if (!s.every((x) => x === 401)) throw new Error(`expected 401s, got ${s.join(',')}`)
}

function auditLines (text: string): Line[] {
  return text.split('\n').filter((l) => l.includes('"log":"audit"')).map((l) => JSON.parse(l) as Line)
}

t.test('node dist/server.js, AUDIT_LOG=<file>, LOG_LEVEL=silent: every denial before SIGTERM is in the file', async (t) => {
  const { port, admin, env } = await unreachableBackendsEnv()
  const file = join(tmp, `audit-${randomUUID()}.log`)
  const p = spawnGateway(t, { ...env, ...QUICK_EXIT, LOG_LEVEL: 'silent', AUDIT_LOG: file })
  await listening(admin)
  const N = 200
  await denials(port, N)
  const counted = await scrapeMetric(`http://${LOOPBACK}:${admin}`, 'resonance_auth_failures_total', { reason: 'missing_token', transport: 'http' })
  t.equal(counted, N, 'the metric counted every denial')
  p.child.kill('SIGTERM')
  t.equal((await within(p.exited, 10_000, 'exit')).code, 0, 'exit 0')
  const lines = auditLines(readFileSync(file, 'utf8'))
  t.equal(lines.length, counted, 'audit lines in the file = metric = denials made')
  t.ok(lines.every((l) => l.event === 'auth_failure' && l.reason === 'missing_token' && l.status === 401), 'each a missing_token line')
  t.equal(new Set(lines.map((l) => l.path)).size, N, 'one per request')
  t.equal(p.stdout(), '', 'LOG_LEVEL=silent: nothing on stdout')
})

t.test('node dist/server.js, LOG_LEVEL=error: audit lines still on stdout (default AUDIT_LOG)', async (t) => {
  const { port, admin, env } = await unreachableBackendsEnv()
  const p = spawnGateway(t, { ...env, ...QUICK_EXIT, LOG_LEVEL: 'error' })
  await listening(admin)
  await denials(port, 5)
  p.child.kill('SIGTERM')
  t.equal((await within(p.exited, 10_000, 'exit')).code, 0)
  const lines = auditLines(p.stdout())
  t.equal(lines.length, 5)
  t.match(lines[0], { level: 40, log: 'audit', component: 'audit', event: 'auth_failure', reason: 'missing_token', transport: 'http', status: 401, msg: 'denied' })
  t.equal(auditLines(p.stderr()).length, 0)
})

t.test('node dist/server.js, AUDIT_LOG=stderr: audit lines on stderr only', async (t) => {
  const { port, admin, env } = await unreachableBackendsEnv()
  const p = spawnGateway(t, { ...env, ...QUICK_EXIT, LOG_LEVEL: 'info', AUDIT_LOG: 'stderr' })
  await listening(admin)
  await denials(port, 3)
  p.child.kill('SIGTERM')
  t.equal((await within(p.exited, 10_000, 'exit')).code, 0)
  t.equal(auditLines(p.stderr()).length, 3, 'on stderr')
  t.equal(auditLines(p.stdout()).length, 0, 'not on stdout')
  t.ok(p.stdout().includes('gateway listening'), 'the diagnostic log stays on stdout')
})

t.test('node dist/server.js, AUDIT_LOG in a missing directory: exit 1 naming the field, no port bound', async (t) => {
  const { port, admin, env } = await unreachableBackendsEnv()
  const p = spawnGateway(t, { ...env, ...QUICK_EXIT, AUDIT_LOG: join(tmp, 'no-such-dir', 'audit.log') })
  t.equal((await within(p.exited, 10_000, 'exit')).code, 1, 'exit 1')
  t.match(p.stderr(), 'audit.log (AUDIT_LOG)')
  t.ok(await canBind(port), 'public port free')
  t.ok(await canBind(admin), 'admin port free')
})
