// The bench's own measuring parts, so that its tables can be trusted:
//   - the HAProxy peer (bench/subjects/haproxy.mjs) really does the JWT work it is compared on: a real haproxy
//     (Debian package; .ci/run installs it) in front of a recording upstream accepts a good RS256 token and refuses
//     a missing, tampered, expired, wrong-issuer, wrong-audience or wrong-alg one, and the app sees only the good
//     one, with X-User-Sub set from the token (a client-supplied X-User-Sub is dropped);
//   - the open-loop load (bench/lib/open-loop.mjs) sends on schedule and measures latency from when a request was
//     due: an app stall and a stall of the sender itself both show in the latencies.
import { spawn, spawnSync } from 'node:child_process'
import { generateKeyPairSync, randomUUID } from 'node:crypto'
import { createServer } from 'node:http'
import { mkdtempSync, writeFileSync } from 'node:fs'
import type { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t from 'tap'
import { SignJWT } from 'jose'
import { freePort } from './helpers/ports.js'
import { startUpstream } from './helpers/upstream.js'
import { until } from './helpers/wait.js'

// bench/ is plain .mjs outside the TypeScript build: loaded untyped.
const haproxyModule = '../bench/subjects/haproxy.mjs'
const openLoopModule = '../bench/lib/open-loop.mjs'
const { haproxyConfig, HAPROXY_HEALTH } = await import(haproxyModule) as {
  haproxyConfig: (o: { port: number, upstream: string, issuer: string, audience: string, pem: string }) => string
  HAPROXY_HEALTH: string
}
const { openLoop, quantile } = await import(openLoopModule) as {
  openLoop: (origin: string, o: { path: string, rate: number, seconds: number, tokens?: string[] }) =>
  Promise<{ latencies: Float64Array, sent: number, ok: number, non2xx: number, errors: number, lateMs: number }>
  quantile: (sorted: Float64Array, q: number) => number | undefined
}

const hasHaproxy = spawnSync('sh', ['-c', 'command -v haproxy'], { stdio: 'ignore' }).status === 0

t.test('the HAProxy peer verifies what it is compared on', { skip: hasHaproxy ? false : 'haproxy is not installed (apt-get install haproxy)' }, async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const { publicKey, privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
  const other = generateKeyPairSync('rsa', { modulusLength: 2048 })
  const dir = mkdtempSync(path.join(tmpdir(), 'bench-haproxy-'))
  const pem = path.join(dir, 'issuer.pem')
  writeFileSync(pem, publicKey.export({ type: 'spki', format: 'pem' }))
  const issuer = 'http://127.0.0.1:1/realms/bench'
  const audience = 'resonance-gateway'
  const port = await freePort()
  const cfg = path.join(dir, 'haproxy.cfg')
  writeFileSync(cfg, haproxyConfig({ port, upstream: upstream.url, issuer, audience, pem }))

  const check = spawnSync('haproxy', ['-c', '-f', cfg], { encoding: 'utf8' })
  t.equal(check.status, 0, `haproxy -c accepts the generated config ${check.stderr}`)
  const child = spawn('haproxy', ['-db', '-f', cfg], { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (d: Buffer) => { stderr += String(d) })
  t.teardown(() => { child.kill('SIGKILL') })
  const base = `http://127.0.0.1:${port}`
  await until(async () => (await fetch(`${base}${HAPROXY_HEALTH}`).catch(() => undefined))?.ok === true, 10_000, `haproxy did not start: ${stderr}`)

  const now = Math.floor(Date.now() / 1000)
  const sign = async (o: { key?: typeof privateKey, iss?: string, aud?: string, exp?: number, sub?: string } = {}): Promise<string> =>
    await new SignJWT({ typ: 'Bearer' })
      .setProtectedHeader({ alg: 'RS256', typ: 'JWT', kid: 'k1' })
      .setIssuer(o.iss ?? issuer).setAudience(o.aud ?? audience).setSubject(o.sub ?? 'alice')
      .setIssuedAt(now).setExpirationTime(o.exp ?? now + 600).setJti(randomUUID())
      .sign(o.key ?? privateKey)
  const call = async (token: string | undefined, extra: Record<string, string> = {}): Promise<number> => {
    const res = await fetch(`${base}/api/resonance/x`, { headers: { ...(token !== undefined ? { authorization: `Bearer ${token}` } : {}), ...extra } })
    await res.arrayBuffer()
    return res.status
  }

  upstream.reset()
  t.equal(await call(await sign({ sub: 'alice' }), { 'x-user-sub': 'mallory' }), 200, 'a good token passes')
  t.equal(upstream.requests.length, 1)
  t.equal(upstream.requests[0]?.headers['x-user-sub'], 'alice', 'X-User-Sub comes from the token, not the client')

  upstream.reset()
  const good = await sign()
  const [h, p, sig] = good.split('.') as [string, string, string]
  const flipped = `${h}.${p}.${sig.slice(0, 10)}${sig[10] === 'A' ? 'B' : 'A'}${sig.slice(11)}`
  const hs256 = `${Buffer.from(JSON.stringify({ alg: 'HS256', typ: 'JWT' })).toString('base64url')}.${p}.${sig}`
  const refused: Array<[string, string | undefined]> = [
    ['no token', undefined],
    ['tampered signature', flipped],
    ['signed by another key', await sign({ key: other.privateKey })],
    ['expired', await sign({ exp: now - 60 })],
    ['wrong issuer', await sign({ iss: 'http://evil.example/realms/bench' })],
    ['wrong audience', await sign({ aud: 'account' })],
    ['alg switched to HS256', hs256]
  ]
  for (const [what, token] of refused) t.equal(await call(token), 401, `${what}: 401`)
  t.equal(upstream.requests.length, 0, 'the app saw none of the refused requests')
})

t.test('open loop: sends on schedule, latency counted from when a request was due', async (t) => {
  let n = 0
  const server = createServer((_req, res) => {
    const i = n++
    // requests 100..119 wait 200 ms: an app stall
    setTimeout(() => res.end('ok'), i >= 100 && i < 120 ? 200 : 0)
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise((resolve) => server.close(resolve)))
  const origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`

  const rate = 200
  const seconds = 1.5
  // The sender itself freezes for 150 ms half-way: requests due meanwhile leave late, and that must count.
  setTimeout(() => { const end = performance.now() + 150; while (performance.now() < end); }, 900)
  const started = performance.now()
  const r = await openLoop(origin, { path: '/x', rate, seconds })
  const elapsed = (performance.now() - started) / 1000

  t.equal(r.sent, rate * seconds, 'every scheduled request was sent')
  t.equal(r.ok, rate * seconds, 'and answered')
  t.equal(r.errors + r.non2xx, 0)
  t.ok(elapsed >= seconds && elapsed < seconds + 1.5, `the run lasts about its duration (${elapsed.toFixed(2)} s)`)
  t.ok(r.lateMs >= 140, `the sender's own stall is reported (${r.lateMs.toFixed(0)} ms behind schedule)`)
  // App stall: requests 100..119 (due at 0.5-0.6 s) take >= 200 ms. Sender stall at 0.9 s: the ~30 requests due
  // during its 150 ms leave late, and each counts its wait (150 ms down to 0; >= 10 ms for ~28 of them).
  const appStalled = r.latencies.filter((x) => x >= 190).length
  t.ok(appStalled >= 20, `the app stall shows: ${appStalled} requests >= 190 ms`)
  const waited = r.latencies.filter((x) => x >= 10).length
  t.ok(waited >= 20 + 25, `the sender stall shows too: ${waited} requests >= 10 ms (20 app-stalled + ~28 sent late)`)
  t.ok((quantile(r.latencies, 0.5) ?? Infinity) < 50, `the rest is fast (p50 ${quantile(r.latencies, 0.5)?.toFixed(2)} ms)`)
})
