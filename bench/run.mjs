#!/usr/bin/env node
// `npm run bench`: what the gateway costs per request, as a ratio against a
// plain @fastify/http-proxy measured in the same run. See bench/README.md.
//
//   load generator (autocannon, in this process)   pinned to CPU A
//   app, issuer, plain proxy, gateway(s)           pinned to CPU B, one process each
//
// Every subject runs once per round, rounds are interleaved (round 1: every
// subject, round 2: every subject, ...), each run = warm-up then measurement,
// and the table reports medians over rounds. CPU µs/request = utime+stime of
// the subject's process during the measurement / responses received.
//
// Env: BENCH_DURATION (s, measurement per round, default 10), BENCH_WARMUP
// (s, per round, 5), BENCH_ROUNDS (3), BENCH_PRIME (s, one extra warm-up per
// subject before round 1, 5), BENCH_CONNECTIONS (64), BENCH_TOKENS (1000),
// BENCH_SUBJECTS (comma list of names; default: the `default: true` rows).
import { mkdtempSync, mkdirSync, rmSync, writeFileSync, existsSync, readFileSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { randomUUID } from 'node:crypto'
import autocannon from 'autocannon'
import { SignJWT, calculateJwkThumbprint, exportJWK, generateKeyPair } from 'jose'
import {
  busySeconds, cpuSeconds, describeTail, freePorts, installCleanup, setupPinning, spawnNode, stopAll, waitHello, waitHttpOk
} from './lib/children.mjs'

const BENCH_DIR = path.dirname(fileURLToPath(import.meta.url))
const ROOT = path.resolve(BENCH_DIR, '..')
const GATEWAY_ENTRY = path.join(ROOT, 'dist/server.js')
const RESULTS_FILE = path.join(BENCH_DIR, 'results/latest.md')
const REALM = 'bench'
const AUDIENCE = 'resonance-gateway'
const CLIENT_ID = 'resonance-web'
const REQUEST_PATH = '/api/resonance/items/'
const BASELINE = 'plain-proxy'

// ------------------------------------------------------------- settings --

/** A mistake in how the bench was invoked: reported as one line, no stack. */
class UsageError extends Error {}

function envNumber (name, def, { min = 0, integer = false } = {}) {
  const raw = process.env[name]
  if (raw === undefined || raw.trim() === '') return def
  const n = Number(raw)
  if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
    process.stderr.write(`bench: ${name}=${raw}: must be ${integer ? 'an integer' : 'a number'} >= ${min}\n`)
    process.exit(2)
  }
  return n
}

const S = {
  duration: envNumber('BENCH_DURATION', 10, { min: 1 }),
  warmup: envNumber('BENCH_WARMUP', 5),
  prime: envNumber('BENCH_PRIME', 5),
  rounds: envNumber('BENCH_ROUNDS', 3, { min: 1, integer: true }),
  connections: envNumber('BENCH_CONNECTIONS', 64, { min: 1, integer: true }),
  tokens: envNumber('BENCH_TOKENS', 1000, { min: 1, integer: true })
}

// ------------------------------------------------------------- subjects --
//
// THE EXTENSION POINT. One row per thing under load. `start(ctx)` returns
//   { url, pid, child?, others?: [{ label, pid }] }
// where `pid` is the process whose CPU the table reports and `others` are
// extra processes whose CPU/request goes into the details (the app always;
// add redis-server there for a Redis-backed variant). `auth: true` makes the
// preflight insist on 401 without a token and on the identity reaching the
// app with one. `default: false` rows run only when named in BENCH_SUBJECTS.
//
// Gateway variants differ only in env (see gatewayEnv for the shared part),
// e.g. for the rate-limit issue:
//   { name: 'gateway-rl-memory', title: 'gateway, rate limit, memory store', auth: true, default: true,
//     start: (ctx) => startGateway(ctx, 'gateway-rl-memory', { RATE_LIMIT_MAX: '1000000000' }) },
//   { name: 'gateway-rl-redis', title: 'gateway, rate limit, Redis store', auth: true, default: true,
//     start: async (ctx) => withOthers(await startGateway(ctx, 'gateway-rl-redis', { REDIS_URL: ctx.redisUrl }),
//       [{ label: 'redis', pid: ctx.redisPid }]) },
const SUBJECTS = [
  {
    name: 'direct',
    title: 'app, no proxy',
    auth: false,
    default: true,
    start: (ctx) => ({ url: ctx.app.url, pid: ctx.app.pid, child: ctx.app.child, others: [] })
  },
  {
    name: BASELINE,
    title: '@fastify/http-proxy, no auth (baseline)',
    auth: false,
    default: true,
    start: (ctx) => startScript(ctx, BASELINE, path.join(BENCH_DIR, 'subjects/plain-proxy.mjs'), { UPSTREAM_URL: ctx.app.url })
  },
  {
    name: 'gateway',
    title: 'gateway (dist/server.js), auth on, default settings (no REDIS_URL)',
    auth: true,
    default: true,
    start: (ctx) => startGateway(ctx, 'gateway', {})
  },
  {
    // Every request pays the RS256 signature check (no fast-jwt verify cache).
    name: 'gateway-nocache',
    title: 'gateway, auth on, JWT_CACHE_SIZE=0',
    auth: true,
    default: false,
    start: (ctx) => startGateway(ctx, 'gateway-nocache', { JWT_CACHE_SIZE: '0' })
  }
]

/** The environment every gateway variant shares; variants add or override keys. */
function gatewayEnv (ctx, ports) {
  return {
    ...ctx.cleanEnv,
    JWT_ISSUER: ctx.issuer.issuer,
    JWT_AUDIENCE: AUDIENCE,
    ALLOW_INSECURE_HTTP: 'true',
    LOG_LEVEL: 'warn',
    CONFIG_FILE: ctx.emptyConfig,
    HOST: '127.0.0.1',
    PORT: String(ports.port),
    ADMIN_HOST: '127.0.0.1',
    ADMIN_PORT: String(ports.adminPort),
    UPSTREAM_URL: ctx.app.url,
    // 1000 users at thousands of req/s would exceed any realistic per-user
    // limit; the bench measures the limiter's cost, never its 429s.
    RATE_LIMIT_MAX: '1000000000',
    SHUTDOWN_DELAY: '0'
  }
}

async function startGateway (ctx, name, extraEnv) {
  const [port, adminPort] = await freePorts(2)
  const child = spawnNode(name, GATEWAY_ENTRY, { cwd: ROOT, env: { ...gatewayEnv(ctx, { port, adminPort }), ...extraEnv }, pin: ctx.pin })
  // /readyz is 200 once the JWKS is loaded.
  await waitHttpOk(child, `http://127.0.0.1:${adminPort}/readyz`)
  return { url: `http://127.0.0.1:${port}`, pid: child.pid, child, others: [{ label: 'app', pid: ctx.app.pid }] }
}

async function startScript (ctx, name, script, extraEnv) {
  const child = spawnNode(name, script, { cwd: ROOT, env: { ...ctx.cleanEnv, ...extraEnv }, pin: ctx.pin })
  const { port } = await waitHello(child)
  return { url: `http://127.0.0.1:${port}`, pid: child.pid, child, others: [{ label: 'app', pid: ctx.app.pid }] }
}

// --------------------------------------------------------------- tokens --

async function makeKey () {
  const { publicKey, privateKey } = await generateKeyPair('RS256', { modulusLength: 2048 })
  const jwk = await exportJWK(publicKey)
  jwk.kid = await calculateJwkThumbprint(jwk)
  jwk.alg = 'RS256'
  jwk.use = 'sig'
  return { privateKey, jwk }
}

/** N distinct Keycloak-like access tokens (distinct subs), valid for an hour. */
async function signTokens (key, issuer, n) {
  const now = Math.floor(Date.now() / 1000)
  const tokens = []
  for (let i = 0; i < n; i++) {
    const sub = randomUUID()
    tokens.push(new SignJWT({
      azp: CLIENT_ID,
      typ: 'Bearer',
      scope: 'openid profile email',
      sid: randomUUID(),
      preferred_username: `bench-user-${i}`,
      email_verified: true,
      realm_access: { roles: ['default-roles-bench', 'offline_access', 'user'] },
      resource_access: { account: { roles: ['view-profile'] } }
    })
      .setProtectedHeader({ alg: 'RS256', typ: 'JWT', kid: key.jwk.kid })
      .setIssuer(issuer)
      .setAudience(AUDIENCE)
      .setSubject(sub)
      .setIssuedAt(now)
      .setExpirationTime(now + 3600)
      .setJti(randomUUID())
      .sign(key.privateKey)
      .then((jwt) => ({ sub, jwt })))
  }
  return Promise.all(tokens)
}

// ------------------------------------------------------- load generator --

let current // the running autocannon instance, stopped on abort

/**
 * One autocannon run of `seconds` against `url`. The tokens are dealt out
 * to the connections (connection i cycles through its own ceil(N/connections)
 * tokens, like users holding keep-alive connections), so every token is in
 * use and each request is a prebuilt buffer: a per-request setupRequest costs
 * the load generator ~20 µs, and giving every connection the whole list costs
 * seconds of cloning per run. Returns autocannon's result plus our own latency
 * samples (autocannon's histogram has 1 ms resolution) and the load
 * generator's CPU use.
 */
function runLoad (url, tokens, seconds, { recordLatency }) {
  const requests = tokens.map((t, i) => ({
    method: 'GET',
    path: `${REQUEST_PATH}${i}`,
    headers: { authorization: `Bearer ${t.jwt}`, accept: 'application/json' }
  }))
  const perClient = Math.ceil(requests.length / S.connections)
  let clientIndex = 0
  const latencies = recordLatency ? new Latencies() : undefined
  return new Promise((resolve, reject) => {
    const cpu0 = process.cpuUsage()
    const t0 = process.hrtime.bigint()
    current = autocannon({
      url,
      connections: S.connections,
      duration: seconds,
      pipelining: 1,
      requests: requests.slice(0, 1), // replaced per connection below
      setupClient: (client) => {
        const first = (clientIndex++ * perClient) % requests.length
        client.setRequests(Array.from({ length: perClient }, (_x, j) => ({ ...requests[(first + j) % requests.length] })))
      }
    }, (err, result) => {
      current = undefined
      if (err) return reject(err)
      const wall = Number(process.hrtime.bigint() - t0) / 1e9
      const cpu = process.cpuUsage(cpu0)
      resolve({ result, latencies, loadgenCpuPct: (cpu.user + cpu.system) / 1e6 / wall * 100 })
    })
    if (latencies) current.on('response', (_client, _status, _bytes, ms) => latencies.add(ms))
  })
}

class Latencies {
  constructor () { this.a = new Float64Array(1 << 16); this.n = 0 }
  add (ms) {
    if (this.n === this.a.length) {
      const b = new Float64Array(this.a.length * 2)
      b.set(this.a)
      this.a = b
    }
    this.a[this.n++] = ms
  }

  percentiles (...ps) {
    const s = this.a.subarray(0, this.n).sort()
    return ps.map((p) => (this.n === 0 ? NaN : s[Math.min(this.n - 1, Math.max(0, Math.ceil(p * this.n) - 1))]))
  }
}

/** Warm-up (discarded) then the measured run, with CPU read around the latter. */
async function measure (subject, run, tokens, warmupSeconds, pin) {
  let warmupBad = 0
  if (warmupSeconds > 0) {
    const w = await runLoad(run.url, tokens, warmupSeconds, { recordLatency: false })
    warmupBad = w.result.non2xx + w.result.errors + w.result.timeouts
  }
  const pids = [{ label: 'subject', pid: run.pid }, ...run.others]
  const before = pids.map((p) => cpuSeconds(p.pid))
  // Pinned: the subject core and the load-generator core separately; else the whole machine.
  const cores = pin.applied ? [pin.subjectCpu, pin.loadgenCpu] : [undefined]
  const busy0 = cores.map(busySeconds)
  const t0 = process.hrtime.bigint()
  const { result, latencies, loadgenCpuPct } = await runLoad(run.url, tokens, S.duration, { recordLatency: true })
  const wall = Number(process.hrtime.bigint() - t0) / 1e9
  const busy1 = cores.map(busySeconds)
  const after = pids.map((p) => cpuSeconds(p.pid))
  const total = result.requests.total
  const cpu = pids.map((p, i) => {
    const sec = before[i] === undefined || after[i] === undefined ? undefined : after[i] - before[i]
    return { label: p.label, usPerReq: sec === undefined || total === 0 ? undefined : sec * 1e6 / total, pct: sec === undefined ? undefined : sec / wall * 100 }
  })
  const [p50, p99] = latencies.percentiles(0.5, 0.99)
  // What the cores did that was not the subject, its app or the load generator
  // (other users of a shared box, mostly): the noise, in % of one core.
  const subjectSide = cpu.reduce((sum, c) => sum + (c.pct ?? 0), 0)
  const busyPct = busy0.map((b, i) => (b === undefined || busy1[i] === undefined ? undefined : (busy1[i] - b) / wall * 100))
  const foreign = (pct, ours) => (pct === undefined ? undefined : Math.max(0, pct - ours))
  const noise = pin.applied
    ? { subjectCore: foreign(busyPct[0], subjectSide), loadgenCore: foreign(busyPct[1], loadgenCpuPct) }
    : { machine: foreign(busyPct[0], subjectSide + loadgenCpuPct) }
  return {
    subject: subject.name,
    rps: total / result.duration,
    total,
    p50,
    p99,
    cpuUsPerReq: cpu[0].usPerReq,
    cpuPct: cpu[0].pct,
    others: cpu.slice(1),
    loadgenCpuPct,
    noise,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    statusCodes: Object.fromEntries(Object.entries(result.statusCodeStats).map(([k, v]) => [k, v.count])),
    warmupBad
  }
}

// ------------------------------------------------------------ preflight --

/** One request per subject before any load: proves the path works (and that auth is really on). */
async function preflight (subject, run, tokens) {
  const t = tokens[0]
  const res = await fetch(`${run.url}${REQUEST_PATH}preflight`, { headers: { authorization: `Bearer ${t.jwt}` } })
  const body = await res.text()
  const fail = (why) => { throw new Error(`preflight ${subject.name}: ${why}\n${run.child ? describeTail(run.child) : ''}`) }
  if (res.status !== 200) fail(`expected 200 with a valid token, got ${res.status} ${body.slice(0, 300)}`)
  let json
  try { json = JSON.parse(body) } catch { fail(`the answer is not the app's JSON: ${body.slice(0, 300)}`) }
  if (json.ok !== true) fail(`the answer is not the app's JSON: ${body.slice(0, 300)}`)
  if (subject.auth) {
    if (json.user !== t.sub) fail(`the app did not receive the identity (x-user-sub = ${json.user}, expected ${t.sub})`)
    const anon = await fetch(`${run.url}${REQUEST_PATH}preflight`)
    await anon.arrayBuffer()
    if (anon.status !== 401) fail(`expected 401 without a token, got ${anon.status}: auth is not on`)
  }
  return Buffer.byteLength(body)
}

// -------------------------------------------------------------- helpers --

function median (xs) {
  const v = xs.filter((x) => x !== undefined && Number.isFinite(x)).sort((a, b) => a - b)
  if (v.length === 0) return undefined
  const m = v.length >> 1
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2
}

const fmt = {
  int: (x) => (x === undefined ? 'n/a' : Math.round(x).toLocaleString('en-US')),
  ms: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(2)),
  us: (x) => (x === undefined ? 'n/a' : x.toFixed(0)),
  ratio: (x) => (x === undefined ? 'n/a' : `${x.toFixed(2)}×`),
  pct: (x) => (x === undefined ? 'n/a' : `${x.toFixed(0)}%`)
}

function gitDescribe () {
  try {
    const head = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT, encoding: 'utf8' }).trim()
    const dirty = execFileSync('git', ['status', '--porcelain', '--', 'src'], { cwd: ROOT, encoding: 'utf8' }).trim()
    return dirty ? `${head} + uncommitted changes in src/ (${dirty.split('\n').length} files)` : head
  } catch {
    return 'unknown'
  }
}

function version (pkg) {
  try {
    return JSON.parse(readFileSync(path.join(ROOT, 'node_modules', pkg, 'package.json'), 'utf8')).version
  } catch {
    return '?'
  }
}

function fmtNoise (n) {
  return n.machine !== undefined || n.subjectCore === undefined
    ? `${fmt.pct(n.machine)} (machine)`
    : `${fmt.pct(n.subjectCore)} / ${fmt.pct(n.loadgenCore)}`
}

function table (rows) {
  const lines = [
    '| subject | req/s | p50 ms | p99 ms | CPU µs/req (subject process) | req/s vs plain proxy | CPU/req vs plain proxy | non-2xx |',
    '|---|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    lines.push(`| ${r.name} | ${fmt.int(r.rps)} | ${fmt.ms(r.p50)} | ${fmt.ms(r.p99)} | ${fmt.us(r.cpu)} | ${fmt.ratio(r.rpsRatio)} | ${fmt.ratio(r.cpuRatio)} | ${r.bad === 0 ? '0' : `**${r.bad}**`} |`)
  }
  return lines.join('\n')
}

function banner (text) {
  const line = '!'.repeat(78)
  return `\n${line}\n!! ${text.split('\n').join('\n!! ')}\n${line}\n`
}

// ----------------------------------------------------------------- main --

async function main () {
  if (!existsSync(GATEWAY_ENTRY)) throw new UsageError(`${GATEWAY_ENTRY} not found: run \`npm run build\` (npm run bench does)`)

  const wanted = process.env.BENCH_SUBJECTS?.split(',').map((s) => s.trim()).filter(Boolean)
  for (const w of wanted ?? []) {
    if (!SUBJECTS.some((s) => s.name === w)) throw new UsageError(`BENCH_SUBJECTS: unknown subject "${w}" (known: ${SUBJECTS.map((s) => s.name).join(', ')})`)
  }
  const subjects = SUBJECTS.filter((s) => (wanted ? wanted.includes(s.name) : s.default))
  const planned = subjects.length * (S.prime + S.rounds * (S.warmup + S.duration))
  const started = Date.now()

  const tmp = mkdtempSync(path.join(os.tmpdir(), 'resonance-bench-'))
  process.on('exit', () => rmSync(tmp, { recursive: true, force: true }))
  installCleanup(() => current?.stop())
  // Runaway guard: the run is bounded even if something hangs.
  setTimeout(() => { throw new Error(`bench exceeded its time budget (${Math.round(planned + 120)} s)`) }, (planned + 120) * 1000).unref()

  const nproc = os.availableParallelism() // before pinning narrows it to one CPU
  const pin = setupPinning()
  const pinText = pin.applied
    ? `applied: load generator (this process, pid ${process.pid}) on CPU ${pin.loadgenCpu}; app, issuer and every subject on CPU ${pin.subjectCpu}`
    : `NOT applied (${pin.reason}): load generator and subjects share the CPUs, numbers are noisier`
  console.log(`pinning: ${pinText}`)
  console.log(`plan: ${subjects.map((s) => s.name).join(', ')}; ${S.rounds} rounds × (${S.warmup} s warm-up + ${S.duration} s measured), ` +
    `${S.prime} s priming per subject, ${S.connections} connections, ${S.tokens} tokens; about ${Math.round(planned)} s of load`)

  // The children get none of the gateway's settings from the caller's shell:
  // a stray REDIS_URL or JWKS_URL would silently change what is measured.
  const { LEAVES } = await import(pathToFileURL(path.join(ROOT, 'dist/config/settings.js')).href)
  const cleanEnv = { ...process.env }
  for (const leaf of Object.values(LEAVES)) delete cleanEnv[leaf.env]
  delete cleanEnv.CONFIG_FILE
  delete cleanEnv.NODE_OPTIONS
  const emptyConfig = path.join(tmp, 'empty.yaml')
  writeFileSync(emptyConfig, '# intentionally empty: every setting comes from the environment\n')

  const key = await makeKey()
  const issuerChild = spawnNode('issuer', path.join(BENCH_DIR, 'subjects/issuer.mjs'), {
    cwd: ROOT, pin, env: { ...cleanEnv, BENCH_REALM: REALM, BENCH_JWKS: JSON.stringify({ keys: [key.jwk] }) }
  })
  const appChild = spawnNode('app', path.join(BENCH_DIR, 'subjects/app.mjs'), { cwd: ROOT, pin, env: cleanEnv })
  const [issuerHello, appHello] = await Promise.all([waitHello(issuerChild), waitHello(appChild)])
  const ctx = {
    pin,
    cleanEnv,
    emptyConfig,
    issuer: { issuer: issuerHello.issuer, url: `http://127.0.0.1:${issuerHello.port}`, pid: issuerChild.pid },
    app: { url: `http://127.0.0.1:${appHello.port}`, pid: appChild.pid, child: appChild }
  }

  const t0 = Date.now()
  const tokens = await signTokens(key, ctx.issuer.issuer, S.tokens)
  console.log(`signed ${tokens.length} RS256 tokens (distinct subs) in ${Date.now() - t0} ms; issuer ${ctx.issuer.issuer}`)

  const runs = new Map()
  let bodyBytes
  for (const s of subjects) {
    const run = await s.start(ctx)
    bodyBytes = await preflight(s, run, tokens)
    runs.set(s.name, run)
    console.log(`started ${s.name} (pid ${run.pid}) at ${run.url}: preflight ok${s.auth ? ' (401 without a token, identity forwarded)' : ''}`)
  }
  // Any child dying from now on invalidates the run.
  let died
  for (const child of [issuerChild, appChild, ...[...runs.values()].map((r) => r.child).filter(Boolean)]) {
    child.steady = true
    child.onUnexpectedExit = (c) => { died ??= `${c.benchName} exited (${c.exitInfo}) during the run\n${describeTail(c)}`; current?.stop() }
  }

  if (S.prime > 0) {
    for (const s of subjects) {
      process.stdout.write(`priming ${s.name} for ${S.prime} s\n`)
      await runLoad(runs.get(s.name).url, tokens, S.prime, { recordLatency: false })
      if (died) throw new Error(died)
    }
  }

  const results = [] // per round, per subject
  for (let round = 1; round <= S.rounds; round++) {
    // Rotate the order each round so no subject always runs first or last.
    const order = subjects.map((_s, i) => subjects[(i + round - 1) % subjects.length])
    for (const s of order) {
      const m = await measure(s, runs.get(s.name), tokens, S.warmup, pin)
      if (died) throw new Error(died)
      m.round = round
      results.push(m)
      const bad = m.non2xx + m.errors + m.timeouts
      console.log(`round ${round}/${S.rounds} ${s.name.padEnd(16)} ${fmt.int(m.rps).padStart(7)} req/s  p50 ${fmt.ms(m.p50)} ms  p99 ${fmt.ms(m.p99)} ms  ` +
        `${fmt.us(m.cpuUsPerReq)} µs/req (${fmt.pct(m.cpuPct)} CPU)  load generator ${fmt.pct(m.loadgenCpuPct)}  other load ${fmtNoise(m.noise)}${bad ? `  NON-2XX/ERRORS: ${bad}` : ''}`)
    }
  }

  // ---- aggregate: medians over rounds; ratios per round (same conditions), then their median
  const byRound = (name) => results.filter((r) => r.subject === name)
  const baselineRounds = new Map(byRound(BASELINE).map((r) => [r.round, r]))
  const rows = subjects.map((s) => {
    const rs = byRound(s.name)
    const ratio = (f) => (baselineRounds.size === 0
      ? undefined
      : median(rs.map((r) => { const b = baselineRounds.get(r.round); return b && f(b) ? f(r) / f(b) : undefined })))
    return {
      name: s.name,
      title: s.title,
      rps: median(rs.map((r) => r.rps)),
      p50: median(rs.map((r) => r.p50)),
      p99: median(rs.map((r) => r.p99)),
      cpu: median(rs.map((r) => r.cpuUsPerReq)),
      rpsRatio: ratio((r) => r.rps),
      cpuRatio: ratio((r) => r.cpuUsPerReq),
      bad: rs.reduce((n, r) => n + r.non2xx + r.errors + r.timeouts, 0),
      warmupBad: rs.reduce((n, r) => n + r.warmupBad, 0),
      loadgen: median(rs.map((r) => r.loadgenCpuPct)),
      cpuPct: median(rs.map((r) => r.cpuPct)),
      others: [...new Set(rs.flatMap((r) => r.others.map((o) => o.label)))].map((label) => ({
        label, usPerReq: median(rs.map((r) => r.others.find((o) => o.label === label)?.usPerReq))
      }))
    }
  })

  let issuerStats = 'n/a'
  try { issuerStats = JSON.stringify(await (await fetch(`${ctx.issuer.url}/stats`)).json()) } catch {}

  const elapsed = (Date.now() - started) / 1000
  const tbl = table(rows)
  const warnings = []
  for (const r of rows) {
    if (r.bad > 0) warnings.push(`${r.name}: ${r.bad} non-2xx responses / socket errors / timeouts in measured rounds: THESE NUMBERS ARE INVALID (see the per-round status codes)`)
    if (r.warmupBad > 0) warnings.push(`${r.name}: ${r.warmupBad} non-2xx responses / errors during warm-up`)
    if (r.loadgen !== undefined && r.loadgen > 90) warnings.push(`${r.name}: the load generator used ${fmt.pct(r.loadgen)} of its CPU: its req/s may be limited by autocannon, not by the subject (CPU µs/req is still valid)`)
  }
  const noisy = median(results.map((m) => m.noise.subjectCore ?? m.noise.machine))
  if (noisy !== undefined && noisy > 10) {
    warnings.push(`other processes used a median ${fmt.pct(noisy)} of ${pin.applied ? 'the subject core' : 'a core'} during the measurements (the machine was shared): ` +
      'req/s and latencies are pessimistic and noisy; CPU µs/req holds up better')
  }
  if (!pin.applied) warnings.push(`CPU pinning not applied (${pin.reason})`)
  if (subjects.every((s) => s.name !== BASELINE)) warnings.push(`the baseline (${BASELINE}) was not run: no ratios`)
  const logLines = []
  for (const [name, run] of [['issuer', { child: issuerChild }], ['app', { child: appChild }], ...runs]) {
    if (run.child?.lines.length) logLines.push(`- ${name}: ${run.child.lines.length} stdout lines during the run, last: \`${run.child.lines.at(-1).slice(0, 300)}\``)
  }
  if (logLines.length) warnings.push('subjects logged during the run (at LOG_LEVEL=warn a healthy gateway is silent):\n' + logLines.join('\n'))

  console.log(`\n${tbl}\n`)
  console.log(`medians of ${S.rounds} interleaved rounds; ${S.duration} s measured per round after ${S.warmup} s warm-up; ${S.connections} connections; run time ${elapsed.toFixed(0)} s`)
  for (const w of warnings) console.log(w.startsWith('subjects logged') ? `note: ${w}` : banner(w))

  const cpus = os.cpus()
  const details = results.map((m) => `| ${m.round} | ${m.subject} | ${fmt.int(m.rps)} | ${fmt.int(m.total)} | ${fmt.ms(m.p50)} | ${fmt.ms(m.p99)} | ${fmt.us(m.cpuUsPerReq)} | ${fmt.pct(m.cpuPct)} | ` +
    `${m.others.map((o) => `${o.label} ${fmt.us(o.usPerReq)}`).join(', ') || '–'} | ${fmt.pct(m.loadgenCpuPct)} | ${fmtNoise(m.noise)} | ${Object.entries(m.statusCodes).map(([k, v]) => `${k}: ${v}`).join(', ')}${m.errors || m.timeouts ? `; errors ${m.errors}, timeouts ${m.timeouts}` : ''} |`)
  const md = `# Gateway benchmark: latest run

${tbl}

Medians of ${S.rounds} interleaved rounds (ratios: per round against the plain proxy of the same round, then the median).
Subjects: ${rows.map((r) => `**${r.name}**: ${r.title}`).join('; ')}.
${warnings.length ? '\n' + warnings.map((w) => `> **Warning:** ${w.replace(/\n/g, '\n> ')}`).join('\n>\n') + '\n' : ''}
## Machine and settings

- date: ${new Date().toISOString()}
- CPU: ${cpus[0]?.model ?? 'unknown'}; nproc ${nproc}; load average at the end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}
- OS: ${os.type()} ${os.release()}; node ${process.version}
- pinning: ${pinText}
- gateway: dist/ built from ${gitDescribe()}
- packages: fastify ${version('fastify')}, @fastify/http-proxy ${version('@fastify/http-proxy')}, @fastify/jwt ${version('@fastify/jwt')}, autocannon ${version('autocannon')}
- load: autocannon, ${S.connections} connections, pipelining 1, GET ${REQUEST_PATH}<n> with ${S.tokens} distinct RS256 tokens (distinct subs) dealt out to the connections, ${Math.ceil(S.tokens / S.connections)} per connection; app answer ${bodyBytes} bytes of JSON
- per round and subject: ${S.warmup} s warm-up, ${S.duration} s measured; ${S.prime} s priming per subject before round 1
- issuer fetches during the whole run: ${issuerStats}
- run time: ${elapsed.toFixed(0)} s

## Per round

CPU µs/req: utime+stime of the process (all threads) during the measured ${S.duration} s / responses. "CPU" = that process's share of one core; "others" = the app process behind a proxy; "other load" = busy time from /proc/stat (incl. steal) minus the bench's own processes, in % of one core${pin.applied ? ', on the subject core / the load-generator core' : ', whole machine'}: the noise from whatever else ran on the machine.

| round | subject | req/s | responses | p50 ms | p99 ms | CPU µs/req | CPU | others µs/req | load generator CPU | other load | status codes |
|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|
${details.join('\n')}
`
  mkdirSync(path.dirname(RESULTS_FILE), { recursive: true })
  writeFileSync(RESULTS_FILE, md)
  console.log(`wrote ${path.relative(process.cwd(), RESULTS_FILE)}`)

  await stopAll()
  if (rows.some((r) => r.bad > 0)) process.exitCode = 1
}

main().catch((err) => {
  if (err instanceof UsageError) process.stderr.write(`bench: ${err.message}\n`)
  else process.stderr.write(banner(`bench failed: ${err.stack ?? err.message}`))
  process.exit(1) // the exit handler kills every child
})
