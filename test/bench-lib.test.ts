// The bench's own measuring parts, so that its tables can be trusted:
//   - the HAProxy peer (bench/subjects/haproxy.mjs) really does the JWT work it is compared on: a real haproxy
//     (Debian package; .ci/run installs it) in front of a recording upstream accepts a good RS256 token and refuses
//     a missing, tampered, expired, wrong-issuer, wrong-audience or wrong-alg one, and the app sees only the good
//     one, with X-User-Sub set from the token (a client-supplied X-User-Sub is dropped);
//   - the open-loop load (bench/lib/open-loop.mjs) sends on schedule and measures latency from when a request was
//     due: an app stall and a stall of the sender itself both show in the latencies;
//   - the cold-start curve (bench/lib/curve.mjs): steady rate, fractions, the first second at 90% that stays there,
//     the first-seconds mean, CPU per request between samples; and the closed loop's per-second counting
//     (bench/lib/load.mjs runLoad's `live`).
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
const curveModule = '../bench/lib/curve.mjs'
const loadModule = '../bench/lib/load.mjs'
type Curve = Array<number | undefined>
interface Sample { t: number, cpu: number, responses: number }
const curve = await import(curveModule) as {
  steadyRate: (buckets: number[]) => number | undefined
  steadyStart: (seconds: number) => number
  fractions: (buckets: number[], steady: number | undefined) => Curve
  sustainedFrom: (fracs: Curve, o?: { threshold?: number, hold?: number }) => number | undefined
  meanOver: (fracs: Curve, from: number, to: number) => number | undefined
  curveSeconds: (period: number) => number[]
  medianCurve: (curves: Curve[]) => Curve
  ratePerUnit: (samples: Sample[], from: number, to: number, counter: keyof Sample, per: keyof Sample, scale?: number) => number | undefined
}
const { runLoad } = await import(loadModule) as {
  runLoad: (url: string, tokens: Array<{ jwt: string }>, seconds: number, o: { recordLatency: boolean, live?: { t0?: number, responses?: number, buckets?: number[] } }) =>
  Promise<{ result: { requests: { total: number }, non2xx: number, errors: number } }>
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

t.test('cold-start curve: steady rate, fractions, time to 90% that stays', async (t) => {
  // 12 s: a slow start, one dip after reaching 90%, steady 100 in the last third (one outlier the median ignores).
  const buckets = [10, 40, 95, 70, 92, 95, 99, 100, 100, 100, 180, 100]
  t.equal(curve.steadyRate(buckets), 100, 'median of the last third (4 of 12 buckets)')
  t.equal(curve.steadyRate([5, 7]), 7, 'at least one bucket')
  t.equal(curve.steadyRate([]), undefined)
  t.same([curve.steadyStart(12), curve.steadyStart(60), curve.steadyStart(2)], [8, 40, 1], 'the window the CPU figures use: the same last third')
  const f = curve.fractions(buckets, 100)
  t.same(f.slice(0, 3), [0.1, 0.4, 0.95])
  t.same(curve.fractions([1, 2], 0), [undefined, undefined], 'no steady rate: no fractions')
  t.equal(curve.sustainedFrom(f), 5, 's3 reaches 0.9 but s4 falls back: the first second that stays (with the next 3) is s5')
  t.equal(curve.sustainedFrom(f, { threshold: 0.9, hold: 0 }), 3, 'hold 0: the first second at 0.9')
  t.equal(curve.sustainedFrom(f, { threshold: 0.99, hold: 3 }), 7, 'threshold 0.99: s7..s10')
  t.equal(curve.sustainedFrom([0.5, 0.5, 0.95, 0.95]), 3, 'near the end, every bucket left must hold')
  t.equal(curve.sustainedFrom([0.5, 0.95, 0.8]), undefined, 'never')
  t.equal(curve.sustainedFrom([0.95, undefined, 0.95, 0.95, 0.95, 0.95]), 3, 'a missing bucket does not count as reached')
  t.equal(curve.meanOver(f, 1, 5), (0.1 + 0.4 + 0.95 + 0.7 + 0.92) / 5)
  t.equal(curve.meanOver(f, 11, 13), undefined, 'seconds past the end')
  t.same(curve.curveSeconds(60), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 45, 60])
  t.same(curve.curveSeconds(8), [1, 2, 3, 4, 5, 6, 7, 8])
  t.same(curve.medianCurve([[0.1, 0.5, 1], [0.3, 0.7], [0.2, 0.6, 1]]), [0.2, 0.6], 'per second, as long as the shortest')
})

t.test('cold-start curve: per-unit rates between the nearest samples', async (t) => {
  // Samples about once a second (jitter), cumulative CPU seconds and responses.
  const samples: Sample[] = [
    { t: 0.004, cpu: 1.0, responses: 0 },
    { t: 1.02, cpu: 1.8, responses: 800 },
    { t: 2.0, cpu: 2.5, responses: 2000 },
    { t: 2.99, cpu: 3.2, responses: 6000 }
  ]
  t.equal(curve.ratePerUnit(samples, 0, 1, 'cpu', 'responses', 1e6), 1000, 's1: 0.8 s of CPU for 800 responses = 1000 µs each')
  t.equal(Math.round(curve.ratePerUnit(samples, 2, 3, 'cpu', 'responses', 1e6) ?? NaN), 175, 's3: 0.7 s for 4000')
  t.equal(Math.round(curve.ratePerUnit(samples, 0, 3, 'cpu', 't', 100) ?? NaN), 74, 'share of a core over the whole window, in %')
  t.equal(curve.ratePerUnit(samples, 2, 2, 'cpu', 'responses'), undefined, 'an empty window')
  t.equal(curve.ratePerUnit([{ t: 0, cpu: 1, responses: 5 }, { t: 1, cpu: 2, responses: 5 }], 0, 1, 'cpu', 'responses'), undefined, 'no responses')
})

t.test('closed loop: responses counted per second from the start of the load', async (t) => {
  const server = createServer((_req, res) => { res.end('ok') })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise((resolve) => server.close(resolve)))
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  const live: { t0?: number, responses?: number, buckets?: number[] } = {}
  const seen: number[] = []
  const poll = setInterval(() => { if (live.responses !== undefined) seen.push(live.responses) }, 200)
  const { result } = await runLoad(url, [{ jwt: 'x' }], 2, { recordLatency: false, live })
  clearInterval(poll)
  t.equal(result.non2xx + result.errors, 0)
  t.ok(live.t0 !== undefined && live.t0 > 0, 'the start time is set')
  const buckets = live.buckets ?? []
  t.ok(buckets.length >= 2 && buckets.length <= 3, `2 s of load fill 2 buckets (plus at most a few last responses in a third): ${buckets.join(' ')}`)
  t.equal(buckets.reduce((a, b) => a + b, 0), live.responses, 'every response in a bucket')
  t.equal(live.responses, result.requests.total, 'as many as autocannon counted')
  t.ok((buckets[0] ?? 0) > 100 && (buckets[1] ?? 0) > 100, 'both seconds have responses')
  t.ok(seen.some((n) => n > 0 && n < (live.responses ?? 0)), 'the count grows while the load runs (a sampler can read it)')
})

t.test('the image\'s Node for the cold-start rows: the version the Dockerfile names, or this Node when it is that one', async (t) => {
  const nodeImage = await import('../bench/lib/node-image.mjs' as string) as {
    imageNodeVersion: (dockerfile: string) => string | undefined
    imageNode: (dockerfile: string) => { version: string, path: string }
  }
  const dir = mkdtempSync(path.join(tmpdir(), 'node-image-'))
  const file = (name: string, text: string): string => { const f = path.join(dir, name); writeFileSync(f, text); return f }
  const repoVersion = nodeImage.imageNodeVersion(path.resolve('Dockerfile'))
  t.match(repoVersion, /^\d+\.\d+\.\d+$/, 'the repo\'s Dockerfile names an exact Node release')
  t.equal(nodeImage.imageNodeVersion(file('a', '# x\nARG NODE_IMAGE=node:24.1.2-bookworm-slim\nFROM node:24.1.2-bookworm-slim\n')), '24.1.2')
  t.equal(nodeImage.imageNodeVersion(file('b', 'FROM node:24-bookworm-slim\n')), undefined, 'no NODE_IMAGE argument: unknown')
  const own = process.version.slice(1)
  t.same(nodeImage.imageNode(file('c', `ARG NODE_IMAGE=node:${own}-bookworm-slim\n`)), { version: own, path: process.execPath },
    'this process\'s Node when it is the image\'s: nothing installed')
  t.throws(() => nodeImage.imageNode(file('d', 'FROM node:24\n')), /no ARG NODE_IMAGE=node:<x\.y\.z>/)
  // npm install into a prefix it cannot create hangs without a word; the bench must fail instead.
  const tmp = process.env.TMPDIR
  process.env.TMPDIR = '/proc/no-such-dir'
  try {
    t.throws(() => nodeImage.imageNode(file('e', 'ARG NODE_IMAGE=node:0.0.1-bookworm-slim\n')), /cannot create \/proc\/no-such-dir\/bench-node-.*0\.0\.1 for Node 0\.0\.1 \(TMPDIR\)/,
      'an unusable TMPDIR: an error naming it, not a hang')
  } finally {
    if (tmp === undefined) delete process.env.TMPDIR
    else process.env.TMPDIR = tmp
  }
})
