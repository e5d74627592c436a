// The real entrypoint (`node dist/server.js`, as the container runs it), configured by environment only: invalid
// configuration exits 1 before binding any port; a valid one serves the admin endpoints on the admin port only and
// shuts down gracefully on SIGTERM (readiness fails first, then exit 0).
import { once } from 'node:events'
import http from 'node:http'
import net, { type AddressInfo } from 'node:net'
import t, { type Test } from 'tap'
import { canBind, freePort } from './helpers/ports.js'
import { ensureBuilt, spawnGateway, unreachableBackendsEnv } from './helpers/process.js'
import { until, within } from './helpers/wait.js'

const LOOPBACK = '127.0.0.1'

t.before(ensureBuilt)

/** Holds a port for the duration of the test, counting connections. */
async function holdPort (t: Test): Promise<{ port: number, connections: () => number }> {
  let n = 0
  const srv = net.createServer((s) => { n++; s.destroy() })
  srv.listen(0, LOOPBACK)
  await once(srv, 'listening')
  t.teardown(() => { srv.close() })
  return { port: (srv.address() as AddressInfo).port, connections: () => n }
}

interface Res { status: number, headers: http.IncomingHttpHeaders, body: string }

/** One request on a fresh connection (no keep-alive pool to outlive the server). */
async function get (port: number, path: string): Promise<Res> {
  return await new Promise((resolve, reject) => {
    const req = http.get({ host: LOOPBACK, port, path, agent: false, headers: { connection: 'close' }, timeout: 3_000 }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }))
      res.on('error', reject)
    })
    req.on('timeout', () => req.destroy(new Error(`GET ${path} timed out`)))
    req.on('error', reject)
  })
}

const NO_STACK = /^\s+at\s/m
/**
 * An invalid configuration ends the process at once (about 0.3 s of Node start-up and loading on an idle
 * machine, 3-4 s measured with a load average of 10 on 2 cores); the bound only tells "exited" from "hung".
 */
const EXIT_MS = 15_000

t.test('invalid configuration: exit 1 before binding, every problem on stderr, no stack', async (t) => {
  const admin = await freePort()
  const started = Date.now()
  const p = spawnGateway(t, { PORT: 'abc', ADMIN_PORT: String(admin), HOST: LOOPBACK, ADMIN_HOST: LOOPBACK, JWT_AUDIENCE: 'gw' })
  const { code, signal, at } = await within(p.exited, EXIT_MS, 'exit')
  t.equal(code, 1, 'exit code 1')
  t.equal(signal, null)
  t.ok(at - started < EXIT_MS, `exited in ${at - started} ms`)
  const stderr = p.stderr()
  t.match(stderr, 'server.port (PORT)')
  t.match(stderr, 'auth.issuer (JWT_ISSUER)')
  t.match(stderr, 'invalid configuration')
  t.notMatch(stderr, NO_STACK, 'no stack trace')
  t.notMatch(stderr, /EADDRINUSE|listen/i)
  t.notMatch(p.stdout(), /gateway listening/, 'never reported listening')
  t.ok(await canBind(admin), 'admin port is still free')
})

t.test('invalid configuration with both ports valid: neither port is bound', async (t) => {
  const port = await freePort()
  const admin = await freePort()
  const started = Date.now()
  const p = spawnGateway(t, { PORT: String(port), ADMIN_PORT: String(admin), HOST: LOOPBACK, ADMIN_HOST: LOOPBACK, JWT_AUDIENCE: 'gw' })
  const { code, at } = await within(p.exited, EXIT_MS, 'exit')
  t.equal(code, 1)
  t.ok(at - started < EXIT_MS, `exited in ${at - started} ms`)
  t.match(p.stderr(), 'auth.issuer (JWT_ISSUER)')
  t.notMatch(p.stderr(), NO_STACK)
  t.ok(await canBind(port), 'public port is still free')
  t.ok(await canBind(admin), 'admin port is still free')
})

t.test('invalid configuration never attempts to listen, even on ports someone else holds', async (t) => {
  // Had the process tried to listen, it would fail with EADDRINUSE instead of reporting the configuration.
  const pub = await holdPort(t)
  const adm = await holdPort(t)
  const p = spawnGateway(t, { PORT: String(pub.port), ADMIN_PORT: String(adm.port), HOST: LOOPBACK, ADMIN_HOST: LOOPBACK, JWT_ISSUER: 'https://id.example.com/realms/r' })
  const { code } = await within(p.exited, EXIT_MS, 'exit')
  t.equal(code, 1)
  t.match(p.stderr(), 'auth.audience (JWT_AUDIENCE)')
  t.notMatch(p.stderr(), /EADDRINUSE/)
  t.equal(pub.connections() + adm.connections(), 0, 'nothing connected to the held ports')
})

t.test('a valid config: admin endpoints, public port guarded, graceful SIGTERM', async (t) => {
  const { port, admin, env } = await unreachableBackendsEnv() // the JWKS cannot load
  const p = spawnGateway(t, {
    ...env,
    SHUTDOWN_DELAY: '300ms',
    SHUTDOWN_TIMEOUT: '5s',
    LOG_LEVEL: 'info'
  })
  const listening = await p.waitForLog((l) => l.msg === 'gateway listening', 15_000)
  t.ok(listening, 'logged "gateway listening"')

  t.test('admin port: /healthz 200, /readyz 503 while the JWKS cannot load', async (t) => {
    const health = await get(admin, '/healthz')
    t.equal(health.status, 200)
    t.strictSame(JSON.parse(health.body), { status: 'ok' })
    const ready = await get(admin, '/readyz')
    t.equal(ready.status, 503)
    const body = JSON.parse(ready.body) as { status: string, checks: Record<string, { ok: boolean }> }
    t.equal(body.status, 'not_ready')
    t.equal(body.checks.jwks?.ok, false, 'jwks check fails')
    t.equal(body.checks.draining?.ok, true, 'not draining yet')
    const metrics = await get(admin, '/metrics')
    t.equal(metrics.status, 200)
    t.match(metrics.body, /^# HELP resonance_/m, 'admin port serves the metrics text')
  })

  t.test('public port does not serve /metrics, /healthz, /readyz', async (t) => {
    for (const path of ['/metrics', '/healthz', '/readyz']) {
      const res = await get(port, path)
      t.equal(res.status, 401, `${path}: 401 without a token`)
      t.match(String(res.headers['www-authenticate']), /^Bearer/, `${path}: Bearer challenge`)
      t.notMatch(res.body, /# (HELP|TYPE)|resonance_/, `${path}: never the metrics text`)
      t.notMatch(res.body, /"status":"(ok|ready|not_ready)"/, `${path}: never the health answer`)
    }
  })

  t.test('SIGTERM: /readyz 503 draining during SHUTDOWN_DELAY, then exit 0', async (t) => {
    const signalled = Date.now()
    t.ok(p.child.kill('SIGTERM'), 'signal sent')
    let sawDraining = false
    let publicDuringDelay: number | undefined
    await until(async () => {
      const res = await get(admin, '/readyz').catch(() => undefined)
      if (res === undefined) return true // admin listener closed: the delay is over (sawDraining says whether it was seen)
      const body = JSON.parse(res.body) as { checks: Record<string, { ok: boolean }> }
      if (res.status !== 503 || body.checks.draining?.ok !== false) return false
      sawDraining = true
      publicDuringDelay = (await get(port, '/anything').catch(() => undefined))?.status
      return true
    }, 5_000, '/readyz draining, or the admin listener closed', 10)
    t.ok(sawDraining, '/readyz answered 503 with the draining check failed')
    t.equal(publicDuringDelay, 401, 'the public port still answers during the delay')
    const { code, signal, at } = await within(p.exited, 6_000, 'exit after SIGTERM')
    t.equal(code, 0, 'exit code 0')
    t.equal(signal, null)
    const took = at - signalled
    t.ok(took >= 250, `waited the shutdown delay (${took} ms)`)
    t.ok(took < 5_000, `within SHUTDOWN_TIMEOUT (${took} ms)`)
    t.ok(await canBind(port), 'public port released')
    t.ok(await canBind(admin), 'admin port released')
  })

  t.test('stdout is JSON lines (pino); stderr stays quiet', async (t) => {
    await p.exited
    const lines = p.stdout().split('\n').filter((l) => l !== '')
    t.ok(lines.length >= 3, `${lines.length} log lines`)
    const bad: string[] = []
    const parsed: Array<Record<string, unknown>> = []
    for (const line of lines) {
      try {
        const o = JSON.parse(line) as Record<string, unknown>
        if (typeof o.level !== 'number' || typeof o.msg !== 'string' || typeof o.time !== 'number') bad.push(line)
        else parsed.push(o)
      } catch {
        bad.push(line)
      }
    }
    t.strictSame(bad, [], 'every stdout line is a pino JSON object with level, time and msg')
    const msgs = parsed.map((o) => o.msg)
    t.ok(msgs.includes('gateway listening'))
    t.ok(msgs.some((m) => typeof m === 'string' && m.startsWith('shutting down')), 'logged the start of the shutdown')
    t.ok(msgs.includes('shutdown complete'))
    t.ok(parsed.some((o) => o.level === 40 && /ALLOW_INSECURE_HTTP/.test(String(o.msg))), 'config warnings are logged')
    t.notMatch(p.stderr(), NO_STACK, 'no stack trace on stderr')
  })
})
