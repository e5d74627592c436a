#!/usr/bin/env node
// `npm run bench:auth-flood`: the CPU cost of a bad-token flood from one IP.
// See bench/README.md, "Bad-token flood from one IP".
//
//   load generator (autocannon, in this process)                        pinned to CPU A
//   app, issuer, two gateways, private redis-server (Redis pass only)   pinned to CPU B
//
// Every request comes from 127.0.0.1. Two gateways per pass, alike but for the
// auth-failure limit:
//   open     AUTH_FAILURE_LIMIT_MAX=1000000000: the IP is never blocked, every
//            failure is counted (what a flood costs before the block);
//   blocked  AUTH_FAILURE_LIMIT_MAX=BENCH_FLOOD_BLOCK_MAX (10): blocked by a few
//            bad tokens before its phases, and it stays blocked
//            (AUTH_FAILURE_LIMIT_WINDOW=1h, longer than the run).
// Each phase = warm-up (discarded) then a measured window with autocannon.
// Per phase: status codes (checked against what the phase must answer), req/s,
// gateway CPU µs per request (utime+stime from /proc/<pid>/stat / responses),
// the issuer's JWKS fetches during the phase, and with Redis the
// redis-server's CPU and commands per request.
//
// Gateway stdout (pino: one audit line per denial) goes to /dev/null, so the
// bench reads no pipe at tens of thousands of lines per second; denials are
// counted from the gateway's own metrics instead (one counter increment per
// audit line). BENCH_FLOOD_LOGS=1 pipes it to the runner instead, to see why a
// gateway does not start.
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createPublicKey, randomBytes, verify as cryptoVerify } from 'node:crypto'
import os from 'node:os'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import autocannon from 'autocannon'
import {
  busySeconds, cpuSeconds, describeTail, freePorts, hasCommand, installCleanup, setupPinning, spawnNode, spawnProcess,
  stopAll, stopChild, waitHttpOk
} from './lib/children.mjs'
import { redisCommandStats, redisServerVersion, startRedis } from './lib/redis.mjs'
// The copy of dist/ every gateway starts from, the children's env, the tokens,
// the issuer and the app, the gateway env: as bench/run.mjs.
import {
  BENCH_DIR, DIST, GATEWAY_ENTRY, REQUEST_PATH, ROOT, childEnv, gatewayEnv, makeKey, profileArgv, signTokens, snapshotDist,
  startIssuerAndApp
} from './lib/setup.mjs'

const GUARD = pathToFileURL(path.join(BENCH_DIR, 'lib/orphan-guard.mjs')).href
/** Longer than any run: the blocked gateway's IP stays blocked from its first phase to its last. */
const BLOCK_WINDOW = '1h'

/**
 * Preloaded into each gateway (--import, written to the run's temp folder):
 * counts signature checks, i.e. calls of crypto.Verify#verify and
 * crypto.verify (fast-jwt makes one createVerify().verify() per RS256 check),
 * and writes the count to BENCH_VERIFY_COUNT_FILE on SIGUSR2. A counter
 * increment per check: nothing measurable next to the RSA operation.
 */
const VERIFY_COUNTER = `import crypto from 'node:crypto'
import { writeFileSync } from 'node:fs'
let checks = 0
let seq = 0
const verify = crypto.Verify.prototype.verify
crypto.Verify.prototype.verify = function (...a) { checks++; return verify.apply(this, a) }
const direct = crypto.verify
crypto.verify = function (...a) { checks++; return direct.apply(this, a) }
process.on('SIGUSR2', () => writeFileSync(process.env.BENCH_VERIFY_COUNT_FILE, JSON.stringify({ seq: ++seq, checks })))
`

// ------------------------------------------------------------- settings --

class UsageError extends Error {}

function envNumber (name, def, { min = 0, integer = false } = {}) {
  const raw = process.env[name]
  if (raw === undefined || raw.trim() === '') return def
  const n = Number(raw)
  if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
    process.stderr.write(`bench:auth-flood: ${name}=${raw}: must be ${integer ? 'an integer' : 'a number'} >= ${min}\n`)
    process.exit(2)
  }
  return n
}

function envList (name) {
  const raw = process.env[name]?.trim()
  return raw ? raw.split(',').map((s) => s.trim()).filter(Boolean) : undefined
}

// ---------------------------------------------------------------- phases --
//
// pool: which Authorization values the requests carry (see makePools).
// expect: the only status codes the phase may answer (warm-up included).
// jwks: the JWKS fetches the phase must cause (undefined: not checked).
// checks: the most signature checks a request may cost (undefined: not checked).
// redis: whether the Redis pass runs it by default (the others touch no store,
// or answer the same question as a phase it runs).
const PHASES = [
  { id: '1', short: 'valid tokens', gw: 'open', pool: 'valid', expect: [200], redis: true, what: 'valid tokens (1000 distinct, in the verified-token cache after first use): the baseline' },
  { id: '2', short: 'no token', gw: 'open', pool: 'none', expect: [401], redis: false, what: 'no token: 401 missing_token, never counted' },
  { id: '3', short: 'bad signature, known kid', gw: 'open', pool: 'badSig', expect: [401], checks: 1, redis: true, what: 'bad signature, known kid (1000 distinct), IP not blocked: 401 after full verification, each failure counted' },
  { id: '3r', short: 'bad signature, one token repeated', gw: 'open', pool: 'badSigOne', expect: [401], checks: 1, redis: false, what: 'as 3 with one bad token repeated: does repetition make it cheaper?' },
  { id: '5u', short: 'made-up kid per request', gw: 'open', pool: 'madeUpKid', expect: [401], redis: false, what: 'made-up kids, IP not blocked: 401 unknown_kid; a JWKS refetch at most once per JWKS_MIN_REFRESH_INTERVAL (10 s)' },
  { id: '4', short: 'bad signature, known kid', gw: 'blocked', pool: 'badSig', expect: [429], checks: 1, redis: true, what: 'bad signature, known kid (1000 distinct), IP blocked: 429 after one signature check' },
  { id: '4r', short: 'bad signature, one token repeated', gw: 'blocked', pool: 'badSigOne', expect: [429], checks: 1, redis: false, what: 'as 4 with one bad token repeated' },
  { id: '5', short: 'made-up kid per request', gw: 'blocked', pool: 'madeUpKid', expect: [429], jwks: 0, checks: 0, redis: true, what: 'made-up kid per request, IP blocked: 429 without signature check or JWKS fetch' },
  { id: '6', short: 'garbage, not a JWT', gw: 'blocked', pool: 'garbage', expect: [429], jwks: 0, checks: 0, redis: true, what: 'garbage that is not a JWT (no dots), IP blocked' },
  { id: '6j', short: 'garbage, JWT-shaped', gw: 'blocked', pool: 'jwtShaped', expect: [429], jwks: 0, checks: 0, redis: false, what: 'JWT-shaped garbage (three random base64url parts), IP blocked' },
  { id: '7', short: 'valid tokens', gw: 'blocked', pool: 'valid', expect: [200], redis: true, what: 'valid tokens from the blocked IP: must all be served' }
]

const S = {
  warmup: envNumber('BENCH_WARMUP', 1),
  duration: envNumber('BENCH_DURATION', 3, { min: 0.5 }),
  rounds: envNumber('BENCH_ROUNDS', 2, { min: 1, integer: true }),
  prime: envNumber('BENCH_PRIME', 3),
  connections: envNumber('BENCH_CONNECTIONS', 64, { min: 1, integer: true }),
  tokens: envNumber('BENCH_TOKENS', 1000, { min: 2, integer: true }),
  madeUpKids: envNumber('BENCH_FLOOD_KIDS', 6400, { min: 1, integer: true }),
  blockMax: envNumber('BENCH_FLOOD_BLOCK_MAX', 10, { min: 1, integer: true }),
  stores: envList('BENCH_FLOOD_STORES'),
  phases: envList('BENCH_FLOOD_PHASES'),
  out: process.env.BENCH_FLOOD_OUT ? path.resolve(process.env.BENCH_FLOOD_OUT) : path.join(BENCH_DIR, 'results/auth-flood.md'),
  json: process.env.BENCH_FLOOD_JSON ? path.resolve(process.env.BENCH_FLOOD_JSON) : undefined,
  logs: ['1', 'true', 'yes', 'on'].includes(process.env.BENCH_FLOOD_LOGS?.trim().toLowerCase() ?? ''),
  // A folder: every gateway runs with --cpu-prof and writes <name>.cpuprofile there when it stops.
  profileDir: process.env.BENCH_PROFILE ? path.resolve(process.env.BENCH_PROFILE) : undefined
}

// --------------------------------------------------------------- tokens --

const b64url = (bytes) => randomBytes(bytes).toString('base64url')

/**
 * Authorization header values per pool (undefined: no header). Every bad
 * token is built from real ones, so its parts have the real lengths:
 *   badSig     token i's header.payload with token i+1's signature: the key is
 *              known, the RSA check runs and fails;
 *   madeUpKid  token i's payload and signature under a header whose kid is
 *              random (BENCH_FLOOD_KIDS distinct kids, cycled);
 *   garbage    random base64url of a token's length without dots: not a JWT;
 *   jwtShaped  three random base64url parts of a token's part lengths.
 */
function makePools (jwts) {
  const parts = jwts.map((t) => t.split('.'))
  const [h0, p0, s0] = parts[0]
  const bearer = (t) => `Bearer ${t}`
  const badSig = parts.map(([h, p], i) => bearer(`${h}.${p}.${parts[(i + 1) % parts.length][2]}`))
  const madeUpKid = Array.from({ length: S.madeUpKids }, (_x, i) => {
    const [, p, s] = parts[i % parts.length]
    const header = Buffer.from(JSON.stringify({ alg: 'RS256', typ: 'JWT', kid: b64url(32) })).toString('base64url')
    return bearer(`${header}.${p}.${s}`)
  })
  const n = Math.min(jwts.length, 1000)
  const bytes = (chars) => Math.floor(chars * 3 / 4)
  return {
    valid: jwts.map(bearer),
    none: [undefined],
    badSig,
    badSigOne: [badSig[0]],
    madeUpKid,
    garbage: Array.from({ length: n }, () => bearer(b64url(bytes(jwts[0].length - 2)))),
    jwtShaped: Array.from({ length: n }, () => bearer(`${b64url(bytes(h0.length))}.${b64url(bytes(p0.length))}.${b64url(bytes(s0.length))}`))
  }
}

/** What one RS256 signature check costs on the load generator's core (node:crypto, as fast-jwt calls it). */
function rsaVerifyMicros (jwk, jwt, n = 400) {
  const key = createPublicKey({ key: jwk, format: 'jwk' })
  const [h, p, s] = jwt.split('.')
  const data = Buffer.from(`${h}.${p}`)
  const sig = Buffer.from(s, 'base64url')
  for (let i = 0; i < 50; i++) cryptoVerify('sha256', data, key, sig)
  const t0 = process.hrtime.bigint()
  let ok = 0
  for (let i = 0; i < n; i++) if (cryptoVerify('sha256', data, key, sig)) ok++
  const us = Number(process.hrtime.bigint() - t0) / 1e3 / n
  if (ok !== n) throw new Error('the reference signature check failed')
  return us
}

// ------------------------------------------------------- load generator --

let current // the running autocannon instance, stopped on abort

/**
 * Closed-loop load for `seconds`: the pool's values are dealt out to the
 * connections (connection i cycles through its own ceil(N / connections)),
 * so every value is in use and each request is prebuilt (see runLoad in
 * bench/run.mjs).
 */
function runLoad (url, pool, seconds) {
  const requests = pool.map((authorization, i) => ({
    method: 'GET',
    path: `${REQUEST_PATH}${i}`,
    headers: authorization === undefined ? { accept: 'application/json' } : { authorization, accept: 'application/json' }
  }))
  const perClient = Math.ceil(requests.length / S.connections)
  let clientIndex = 0
  return new Promise((resolve, reject) => {
    current = autocannon({
      url,
      connections: S.connections,
      duration: seconds,
      pipelining: 1,
      requests: requests.slice(0, 1),
      setupClient: (client) => {
        const first = (clientIndex++ * perClient) % requests.length
        client.setRequests(Array.from({ length: perClient }, (_x, j) => ({ ...requests[(first + j) % requests.length] })))
      }
    }, (err, result) => {
      current = undefined
      if (err) reject(err)
      else resolve(Object.assign(result, { errorCodes }))
    })
    const errorCodes = {}
    current.on('reqError', (e) => { const k = e.code ?? e.message; errorCodes[k] = (errorCodes[k] ?? 0) + 1 })
  })
}

const statusCounts = (result) => Object.fromEntries(Object.entries(result.statusCodeStats ?? {}).map(([k, v]) => [k, v.count]))

// ------------------------------------------------------------- metrics --

async function getJson (url) {
  return (await fetch(url, { signal: AbortSignal.timeout(2000) })).json()
}

/** Samples of the gateway's admin /metrics: { 'name{labels}': value }. */
async function metrics (adminUrl) {
  const text = await (await fetch(`${adminUrl}/metrics`, { signal: AbortSignal.timeout(2000) })).text()
  const out = {}
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const i = line.lastIndexOf(' ')
    out[line.slice(0, i)] = Number(line.slice(i + 1))
  }
  return out
}

/** Denials by kind during a window, from the counters audit.denied() increments: "401 bad_signature" -> n. */
function denials (m0, m1) {
  const out = {}
  for (const [k, v] of Object.entries(m1)) {
    const d = v - (m0[k] ?? 0)
    if (!(d > 0)) continue
    let m = /^resonance_auth_failures_total\{.*reason="([^"]+)"/.exec(k)
    if (m) { out[m[1]] = (out[m[1]] ?? 0) + d; continue }
    m = /^resonance_rate_limit_triggered_total\{/.exec(k)
    if (m) out.rate_limited = (out.rate_limited ?? 0) + d
  }
  return out
}

// ------------------------------------------------------------ processes --

/** A gateway as bench/run.mjs starts its `gateway` subject, plus the auth-failure limit of `kind`. */
async function startGateway (ctx, kind, redis) {
  const [port, adminPort] = await freePorts(2)
  const name = `gateway-${kind}${redis ? '-redis' : ''}`
  const countFile = path.join(ctx.tmp, `${name}.verify-count.json`)
  const env = {
    ...gatewayEnv(ctx, { port, adminPort }, ctx.app.url),
    AUTH_FAILURE_LIMIT_MAX: kind === 'open' ? '1000000000' : String(S.blockMax),
    AUTH_FAILURE_LIMIT_WINDOW: BLOCK_WINDOW,
    ...(redis ? { REDIS_URL: redis.url, RATE_LIMIT_KEY_PREFIX: `flood-${kind}:` } : {}),
    // What one address's flood costs per request, not how many sockets it may hold: the per-address cap on
    // unauthenticated connections (default 64, exactly the load's connection count) would reset some of them.
    MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: '0',
    BENCH_VERIFY_COUNT_FILE: countFile
  }
  const execArgv = ['--import', pathToFileURL(ctx.verifyCounter).href, ...profileArgv(S.profileDir, name)]
  // sh execs node with stdout on /dev/null (taskset and sh exec, so child.pid is node's).
  const child = S.logs
    ? spawnNode(name, GATEWAY_ENTRY, { cwd: ROOT, env, pin: ctx.pin, execArgv })
    : spawnProcess(name, 'sh', ['-c', 'exec "$@" >/dev/null', 'sh', process.execPath, ...execArgv, '--import', GUARD, GATEWAY_ENTRY], { cwd: ROOT, env, pin: ctx.pin })
  const adminUrl = `http://127.0.0.1:${adminPort}`
  try {
    await waitHttpOk(child, `${adminUrl}/readyz`)
  } catch (err) {
    if (!S.logs) err.message += '\n(gateway stdout went to /dev/null: BENCH_FLOOD_LOGS=1 shows it)'
    throw err
  }
  child.onUnexpectedExit = (c) => { ctx.died ??= `${c.benchName} exited (${c.exitInfo}) during the run\n${describeTail(c)}`; current?.stop() }
  return { kind, name, url: `http://127.0.0.1:${port}`, adminUrl, pid: child.pid, child, countFile }
}

function readCount (file) {
  try { return JSON.parse(readFileSync(file, 'utf8')) } catch { return undefined } // absent, or caught mid-write
}

/** The gateway's signature checks so far (see VERIFY_COUNTER), or undefined if it does not answer within 2 s. */
async function signatureChecks (gw) {
  const seq = readCount(gw.countFile)?.seq ?? 0
  process.kill(gw.pid, 'SIGUSR2')
  for (let i = 0; i < 200; i++) {
    await new Promise((resolve) => setTimeout(resolve, 10))
    const c = readCount(gw.countFile)
    if (c !== undefined && c.seq > seq) return c.checks
  }
  return undefined
}

async function status (gw, authorization) {
  const res = await fetch(`${gw.url}${REQUEST_PATH}check`, { headers: authorization ? { authorization } : {} })
  await res.arrayBuffer()
  return res.status
}

/** Bad tokens one at a time until the gateway answers 429: the IP is blocked. Returns the 401s it took. */
async function block (gw, badSig) {
  for (let i = 0; i < S.blockMax * 20 + 100; i++) {
    const s = await status(gw, badSig[i % badSig.length])
    if (s === 429) return i
    if (s !== 401) throw new Error(`blocking ${gw.name}: a bad token got ${s}, expected 401 until the block`)
    if (i >= S.blockMax) await new Promise((resolve) => setTimeout(resolve, 10)) // with Redis the count's answer arrives later
  }
  throw new Error(`${gw.name}: not blocked after ${S.blockMax * 20 + 100} bad tokens (AUTH_FAILURE_LIMIT_MAX=${S.blockMax})`)
}

// -------------------------------------------------------------- measure --

function cpuOf (pids) { return pids.map((p) => cpuSeconds(p.pid)) }

async function measurePhase (ctx, pass, phase, gw, round) {
  const pool = ctx.pools[phase.pool]
  const jwks0 = (await getJson(`${ctx.issuer.url}/stats`)).jwks
  let warmupCodes = {}
  if (S.warmup > 0) warmupCodes = statusCounts(await runLoad(gw.url, pool, S.warmup))
  if (ctx.died) throw new Error(ctx.died)
  const m0 = await metrics(gw.adminUrl)
  const cmds0 = pass.redis ? await redisCommandStats(pass.redis.port) : undefined
  const checks0 = await signatureChecks(gw)
  // Every bench process on the subject core, so that what is left of its busy time is other users' load.
  const pids = [{ label: 'gateway', pid: gw.pid }, ...pass.gateways.filter((g) => g !== gw).map((g) => ({ label: 'idle gateway', pid: g.pid })),
    { label: 'app', pid: ctx.app.pid }, { label: 'issuer', pid: ctx.issuer.pid }, ...(pass.redis ? [{ label: 'redis', pid: pass.redis.pid }] : [])]
  const cpu0 = cpuOf(pids)
  const busy0 = ctx.pin.applied ? busySeconds(ctx.pin.subjectCpu) : busySeconds()
  const lg0 = process.cpuUsage()
  const t0 = process.hrtime.bigint()
  const result = await runLoad(gw.url, pool, S.duration)
  const wall = Number(process.hrtime.bigint() - t0) / 1e9
  const lg = process.cpuUsage(lg0)
  const cpu1 = cpuOf(pids)
  const busy1 = ctx.pin.applied ? busySeconds(ctx.pin.subjectCpu) : busySeconds()
  if (ctx.died) throw new Error(ctx.died)
  const checks1 = await signatureChecks(gw)
  const cmds1 = pass.redis ? await redisCommandStats(pass.redis.port) : undefined
  const m1 = await metrics(gw.adminUrl)
  const jwks1 = (await getJson(`${ctx.issuer.url}/stats`)).jwks

  const total = result.requests.total
  const sec = pids.map((_p, i) => (cpu0[i] === undefined || cpu1[i] === undefined ? undefined : cpu1[i] - cpu0[i]))
  const ours = sec.reduce((a, b) => a + (b ?? 0), 0)
  const lgPct = (lg.user + lg.system) / 1e6 / wall * 100
  const codes = statusCounts(result)
  const bad = [...new Set([...Object.keys(codes), ...Object.keys(warmupCodes)])].filter((c) => !phase.expect.includes(Number(c)))
  const problems = []
  if (total === 0) problems.push('no responses')
  if (bad.length) problems.push(`unexpected status ${bad.map((c) => `${c} ×${(codes[c] ?? 0) + (warmupCodes[c] ?? 0)}`).join(', ')} (expected only ${phase.expect.join('/')})`)
  if (result.errors || result.timeouts) problems.push(`${result.errors} socket errors (${Object.entries(result.errorCodes).map(([k, v]) => `${k} ×${v}`).join(', ')}), ${result.timeouts} timeouts`)
  const jwks = jwks1 - jwks0
  if (phase.jwks !== undefined && jwks !== phase.jwks) problems.push(`${jwks} JWKS fetches (expected ${phase.jwks})`)
  const checks = checks0 === undefined || checks1 === undefined ? undefined : checks1 - checks0
  // Slack for the requests in flight at either edge of the window (at most one per connection).
  if (phase.checks !== undefined && !(checks <= phase.checks * total + 2 * S.connections)) {
    problems.push(`${checks ?? 'unknown'} signature checks for ${total} requests (at most ${phase.checks} each)`)
  }
  const redisSec = sec[pids.findIndex((p) => p.label === 'redis')]
  return {
    store: pass.store,
    phase: phase.id,
    round,
    gateway: gw.kind,
    total,
    rps: total / wall,
    codes,
    warmupCodes,
    denials: denials(m0, m1),
    cpuUs: sec[0] === undefined ? undefined : sec[0] * 1e6 / total,
    cpuPct: sec[0] === undefined ? undefined : sec[0] / wall * 100,
    appUs: sec[pids.findIndex((p) => p.label === 'app')] * 1e6 / total,
    redisUs: redisSec === undefined ? undefined : redisSec * 1e6 / total,
    redisCallsPerReq: cmds0 && cmds1 ? Object.values(calls(cmds0, cmds1)).reduce((a, b) => a + b, 0) / total : undefined,
    redisByCommand: cmds0 && cmds1 ? Object.fromEntries(Object.entries(calls(cmds0, cmds1)).map(([k, v]) => [k, v / total])) : undefined,
    // The few requests still in flight when autocannon stops may add a check or two: "per request" is ± 64 / total.
    checksPerReq: checks0 === undefined || checks1 === undefined ? undefined : (checks1 - checks0) / total,
    jwks,
    loadgenPct: lgPct,
    otherLoadPct: busy0 === undefined || busy1 === undefined ? undefined : Math.max(0, ((busy1 - busy0) - ours - (ctx.pin.applied ? 0 : (lg.user + lg.system) / 1e6)) / wall * 100),
    problems
  }
}

/** Commands Redis ran between two INFO commandstats readings, by name: Lua-internal calls included, INFO itself not. */
function calls (a, b) {
  return Object.fromEntries(Object.entries(b).filter(([k, v]) => k !== 'info' && v > (a[k] ?? 0)).map(([k, v]) => [k, v - (a[k] ?? 0)]))
}

// ---------------------------------------------------------------- report --

const fmt = {
  int: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : Math.round(x).toLocaleString('en-US')),
  us: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x < 10 ? x.toFixed(1) : x.toFixed(0)),
  ratio: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : `${x.toFixed(2)}×`),
  pct: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : `${x.toFixed(0)}%`),
  n2: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(2))
}

function answers (r) {
  const codes = Object.entries(r.codes).map(([c, n]) => `${c} ×${fmt.int(n)}`).join(', ')
  const reasons = Object.entries(r.denials).sort((a, b) => b[1] - a[1]).map(([k]) => k).join(', ')
  return reasons ? `${codes} (${reasons})` : codes
}

function median (xs) {
  const v = xs.filter((x) => x !== undefined && Number.isFinite(x)).sort((a, b) => a - b)
  if (v.length === 0) return undefined
  const m = v.length >> 1
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2
}

function addUp (objs) {
  const out = {}
  for (const o of objs) for (const [k, v] of Object.entries(o)) out[k] = (out[k] ?? 0) + v
  return out
}

/** One row per phase over the rounds: medians; ratios per round against that round's phase 1, then their median. */
function aggregate (results) {
  const base = new Map(results.filter((r) => r.phase === '1').map((r) => [r.round, r]))
  return [...new Set(results.map((r) => r.phase))].map((id) => {
    const rs = results.filter((r) => r.phase === id)
    const cpu = rs.map((r) => r.cpuUs).filter((x) => Number.isFinite(x))
    return {
      phase: id,
      gateway: rs[0].gateway,
      rounds: rs.length,
      rps: median(rs.map((r) => r.rps)),
      cpuUs: median(cpu),
      cpuMin: Math.min(...cpu),
      cpuMax: Math.max(...cpu),
      vs1: median(rs.map((r) => (base.get(r.round) ? r.cpuUs / base.get(r.round).cpuUs : undefined))),
      codes: addUp(rs.map((r) => r.codes)),
      denials: addUp(rs.map((r) => r.denials)),
      jwks: rs.reduce((n, r) => n + r.jwks, 0),
      checksPerReq: median(rs.map((r) => r.checksPerReq)),
      redisUs: median(rs.map((r) => r.redisUs)),
      redisCallsPerReq: median(rs.map((r) => r.redisCallsPerReq)),
      redisByCommand: rs[0].redisByCommand
        ? Object.fromEntries([...new Set(rs.flatMap((r) => Object.keys(r.redisByCommand ?? {})))].map((k) => [k, median(rs.map((r) => r.redisByCommand?.[k] ?? 0))]))
        : undefined,
      loadgenPct: median(rs.map((r) => r.loadgenPct)),
      otherLoadPct: Math.max(...rs.map((r) => r.otherLoadPct ?? NaN)),
      problems: rs.flatMap((r) => r.problems.map((p) => `round ${r.round}: ${p}`))
    }
  })
}

function redisCalls (r) {
  const parts = Object.entries(r.redisByCommand ?? {}).filter(([, v]) => v >= 0.005).map(([k, v]) => `${k} ${fmt.n2(v)}`)
  return parts.length ? parts.join(', ') : fmt.n2(r.redisCallsPerReq)
}

function table (pass) {
  const redis = pass.store === 'redis'
  const lines = [
    '| phase | IP | requests | answers (reasons: the gateway\'s counters) | req/s | gateway CPU µs/req | min–max over rounds | vs phase 1 | signature checks/req | JWKS fetches |' +
      `${redis ? ' redis-server µs/req | Redis commands/req (Lua-internal included) |' : ''} load generator CPU | other load (worst round) |`,
    `|---|---|---|---|---:|---:|---:|---:|---:|---:|${redis ? '---:|---:|' : ''}---:|---:|`
  ]
  for (const r of pass.rows) {
    const phase = PHASES.find((p) => p.id === r.phase)
    lines.push(`| ${r.problems.length ? `**${r.phase} ✗**` : r.phase} | ${r.gateway === 'open' ? 'not blocked' : 'blocked'} | ${phase.short} | ${answers(r)} | ${fmt.int(r.rps)} | **${fmt.us(r.cpuUs)}** | ` +
      `${fmt.us(r.cpuMin)}–${fmt.us(r.cpuMax)} | ${fmt.ratio(r.vs1)} | ${fmt.n2(r.checksPerReq)} | ${r.jwks} |${redis ? ` ${fmt.us(r.redisUs)} | ${redisCalls(r)} |` : ''} ` +
      `${fmt.pct(r.loadgenPct)} | ${fmt.pct(r.otherLoadPct)} |`)
  }
  return lines.join('\n')
}

/** Headline figures of one pass: cost per request of each kind and what a core absorbs. */
function summary (pass, rsaUs) {
  const by = (id) => pass.rows.find((r) => r.phase === id)
  const line = (id, label) => {
    const r = by(id)
    return r ? `${label}: **${fmt.us(r.cpuUs)} µs** of gateway CPU per request (${fmt.ratio(r.vs1)} a valid token's), ~${r.cpuUs ? fmt.int(1e6 / r.cpuUs) : 'n/a'} per core-second` : undefined
  }
  const out = [
    line('1', 'valid token (cached)'),
    line('3', 'bad signature, IP not blocked'),
    line('4', 'bad signature, IP blocked'),
    line('5', 'made-up kid, IP blocked'),
    line('6', 'not-a-JWT garbage, IP blocked'),
    line('6j', 'JWT-shaped garbage, IP blocked')
  ].filter(Boolean)
  const p4 = by('4')
  const p5 = by('5')
  if (p4 && p5) {
    out.push(`phase 4 − phase 5 = ${fmt.us(p4.cpuUs - p5.cpuUs)} µs: what the one (failing) verification of a blocked IP's bad token costs in the gateway, ` +
      `of which the RSA operation itself is ~${fmt.us(rsaUs)} µs (one RS256 check timed alone in the runner)`)
  }
  const rep = [['3', '3r'], ['4', '4r']].filter(([a, b]) => by(a) && by(b)).map(([a, b]) => `${b} vs ${a}: ${fmt.ratio(by(b).cpuUs / by(a).cpuUs)}`)
  if (rep.length) out.push(`one bad token repeated vs 1000 distinct ones (CPU/req, medians): ${rep.join(', ')}`)
  const jw = pass.rows.filter((r) => r.jwks > 0).map((r) => `phase ${r.phase}: ${r.jwks}`)
  out.push(`JWKS fetches: ${jw.length ? jw.join(', ') : 'none'} (phases 5, 6, 6j must have none)`)
  return out.map((l) => `- ${l}`).join('\n')
}

/**
 * One pass: both gateways on `store` (and a private redis-server for `redis`), every phase of `phases` per round,
 * then the block checked again and everything of the pass stopped. Failed checks go to `failures`.
 */
async function runPass (ctx, store, phases, failures) {
  const pass = { store, results: [], notes: [] }
  if (store === 'redis') pass.redis = await startRedis('redis', { pin: ctx.pin, env: ctx.cleanEnv, dir: ctx.redisDir })
  const open = await startGateway(ctx, 'open', pass.redis)
  const blocked = await startGateway(ctx, 'blocked', pass.redis)
  pass.gateways = [open, blocked]
  for (const gw of pass.gateways) {
    const s = await status(gw, ctx.pools.valid[0])
    if (s !== 200) throw new Error(`${gw.name}: a valid token got ${s}, expected 200`)
  }
  console.log(`${store}: gateways up (open pid ${open.pid}, blocked pid ${blocked.pid}${pass.redis ? `, redis-server pid ${pass.redis.pid}` : ''})`)
  // Each gateway gets S.prime s of valid tokens right before its first phase (JIT, verified-token cache, a heap
  // grown to the load): a gateway left idle while the other one ran its phases started its first bad-token
  // phase at up to twice its later CPU per request.
  const primed = new Set()
  let isBlocked = false
  for (let round = 1; round <= S.rounds; round++) {
    // The open gateway's phases, then the blocked one's; within each group the order rotates by one each round,
    // so that no phase is always the first after its gateway sat idle.
    const order = ['open', 'blocked'].flatMap((kind) => {
      const group = phases.filter((p) => p.gw === kind)
      return group.map((_p, i) => group[(i + round - 1) % group.length])
    })
    for (const phase of order) {
      const gw = phase.gw === 'open' ? open : blocked
      if (!primed.has(gw)) {
        primed.add(gw)
        if (S.prime > 0) await runLoad(gw.url, ctx.pools.valid, S.prime)
      }
      if (gw === blocked && !isBlocked) {
        const n = await block(blocked, ctx.pools.badSig)
        isBlocked = true
        pass.notes.push(`the blocked gateway answered 429 after ${n} bad tokens (AUTH_FAILURE_LIMIT_MAX=${S.blockMax}) and stayed blocked to the end`)
        console.log(`${store}: ${blocked.name} blocks 127.0.0.1 after ${n} bad tokens`)
        // The blocked path under load before its first measurement: without this, that first phase
        // cost up to 1.3× its later rounds (its 1 s warm-up was not enough).
        if (S.prime > 0) await runLoad(blocked.url, ctx.pools.badSig, S.prime)
      }
      const r = await measurePhase(ctx, pass, phase, gw, round)
      pass.results.push(r)
      for (const p of r.problems) failures.push(`${store} phase ${phase.id} round ${round}: ${p}`)
      console.log(`${store} round ${round}/${S.rounds} phase ${phase.id.padEnd(2)} ${gw.kind.padEnd(7)} ${fmt.int(r.rps).padStart(7)} req/s  ${fmt.us(r.cpuUs).padStart(4)} µs/req gateway (${fmt.pct(r.cpuPct)} CPU)` +
        `  ${fmt.n2(r.checksPerReq)} sig checks/req  JWKS ${r.jwks}${pass.redis ? `  redis ${fmt.us(r.redisUs)} µs/req, ${fmt.n2(r.redisCallsPerReq)} cmds/req` : ''}  ${answers(r)}  ` +
        `load generator ${fmt.pct(r.loadgenPct)}  other load ${fmt.pct(r.otherLoadPct)}${r.problems.length ? `  FAILED: ${r.problems.join('; ')}` : ''}`)
    }
  }
  pass.rows = aggregate(pass.results)
  if (isBlocked) {
    const s = await status(blocked, ctx.pools.badSig[1])
    if (s !== 429) failures.push(`${store}: after its phases the blocked gateway answered a bad token with ${s}, expected 429 (block lost)`)
  }
  await Promise.all([...pass.gateways.map((g) => stopChild(g.child)), ...(pass.redis ? [stopChild(pass.redis.child)] : [])])
  return pass
}

/** results/auth-flood.md (BENCH_FLOOD_OUT). */
function resultsFile ({ passes, failures, sections, stores, elapsed, pinText, build, rsaUs, issuerStats }) {
  return `# Bad-token flood from one IP: latest run

Gateway CPU per request for each kind of request from one IP (127.0.0.1): ${S.connections} connections, closed loop (autocannon).
${S.rounds} rounds; per round and phase ${S.warmup} s warm-up (discarded), ${S.duration} s measured; medians over the rounds.
"IP": \`not blocked\` = a gateway with AUTH_FAILURE_LIMIT_MAX=1000000000, \`blocked\` = one with AUTH_FAILURE_LIMIT_MAX=${S.blockMax}
(and AUTH_FAILURE_LIMIT_WINDOW=${BLOCK_WINDOW}), blocked before its first phase. "vs phase 1": CPU/req against valid tokens in the
same round, median over rounds. "signature checks/req": calls of crypto's verify in the gateway (a counter preloaded into
it) per response. "JWKS fetches": the issuer's count during the phase, warm-ups included, all rounds. "other load": busy
time of the subject core not spent by the bench's processes (other users of the machine), in % of the core.

Phases:
${PHASES.filter((p) => passes.some((x) => x.rows.some((r) => r.phase === p.id))).map((p) => `- **${p.id}**: ${p.what}`).join('\n')}

${sections.join('\n\n')}
${failures.length ? `\n> **FAILED:** ${failures.join('\n> **FAILED:** ')}\n` : ''}
## Machine and settings

- date: ${new Date().toISOString()}; run time ${elapsed.toFixed(0)} s
- CPU: ${os.cpus()[0]?.model ?? 'unknown'}; load average at the end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}
- node ${process.version}${stores.includes('redis') ? `; ${redisServerVersion()?.replace(/ sha=.*$/, '')}` : ''}
- pinning: ${pinText}
- gateway: dist/ built from ${build.git}, dist/server.js from ${build.at}; env as \`npm run bench\`'s \`gateway\` subject plus AUTH_FAILURE_LIMIT_MAX, AUTH_FAILURE_LIMIT_WINDOW=${BLOCK_WINDOW}; stdout (audit lines) to ${S.logs ? 'the runner' : '/dev/null'}
- pools: ${S.tokens} valid tokens; ${S.tokens} bad-signature tokens (token i's header.payload with token i+1's signature); ${S.madeUpKids} made-up kids; ${Math.min(S.tokens, 1000)} garbage values of each kind; dealt out to the connections and cycled
- one RS256 signature check in the runner (node:crypto, RSA-2048): ${fmt.us(rsaUs)} µs
- issuer fetches during the whole run: ${JSON.stringify(issuerStats ?? 'n/a')}
`
}

// ------------------------------------------------------------------ main --

async function main () {
  if (!existsSync(path.join(DIST, 'server.js'))) throw new UsageError(`${path.join(DIST, 'server.js')} not found: run \`npm run build\` (npm run bench:auth-flood does)`)
  const haveRedis = hasCommand('redis-server')
  const stores = S.stores ?? (haveRedis ? ['memory', 'redis'] : ['memory'])
  for (const s of stores) if (!['memory', 'redis'].includes(s)) throw new UsageError(`BENCH_FLOOD_STORES: unknown store ${s} (memory, redis)`)
  if (stores.includes('redis') && !haveRedis) throw new UsageError('redis-server not found on PATH: install it or set BENCH_FLOOD_STORES=memory')
  for (const id of S.phases ?? []) if (!PHASES.some((p) => p.id === id)) throw new UsageError(`BENCH_FLOOD_PHASES: unknown phase ${id} (${PHASES.map((p) => p.id).join(', ')})`)
  const phasesFor = (store) => PHASES.filter((p) => (S.phases ? S.phases.includes(p.id) : store === 'memory' || p.redis))
  const planned = stores.reduce((n, s) => n + S.rounds * phasesFor(s).length * (S.warmup + S.duration + 0.7) + 2 * S.prime + 6, 10)

  const build = snapshotDist()
  const started = Date.now()
  const tmp = mkdtempSync(path.join(os.tmpdir(), 'resonance-auth-flood-'))
  process.on('exit', () => rmSync(tmp, { recursive: true, force: true }))
  installCleanup(() => current?.stop())
  const budget = Math.round(planned * 1.5 + 90)
  setTimeout(() => { throw new Error(`auth-flood bench exceeded its time budget (${budget} s)`) }, budget * 1000).unref()

  const pin = setupPinning()
  const pinText = pin.applied
    ? `applied: load generator (this process) on CPU ${pin.loadgenCpu}; app, issuer, gateways and redis-server on CPU ${pin.subjectCpu}`
    : `NOT applied (${pin.reason}): load generator and subjects share the CPUs, numbers are noisier`
  console.log(`pinning: ${pinText}`)
  console.log(`plan: stores ${stores.join(', ')}; phases ${stores.map((s) => `${s}: ${phasesFor(s).map((p) => p.id).join(' ')}`).join('; ')}; ` +
    `${S.rounds} rounds × (${S.warmup} s warm-up + ${S.duration} s measured) per phase, ${S.connections} connections from 127.0.0.1; about ${Math.round(planned)} s`)

  const { cleanEnv, emptyConfig } = await childEnv(tmp)
  const redisDir = path.join(tmp, 'redis')
  mkdirSync(redisDir)
  const verifyCounter = path.join(tmp, 'verify-counter.mjs')
  writeFileSync(verifyCounter, VERIFY_COUNTER)

  const key = await makeKey()
  const { issuerChild, appChild, issuer, app } = await startIssuerAndApp(key, { cleanEnv, pin })
  const ctx = {
    pin,
    cleanEnv,
    emptyConfig,
    tmp,
    redisDir,
    verifyCounter,
    died: undefined,
    issuer,
    app
  }
  for (const c of [issuerChild, appChild]) c.onUnexpectedExit = (x) => { ctx.died ??= `${x.benchName} exited (${x.exitInfo}) during the run\n${describeTail(x)}`; current?.stop() }

  const t0 = Date.now()
  const jwts = (await signTokens(key, ctx.issuer.issuer, S.tokens)).map((t) => t.jwt)
  ctx.pools = makePools(jwts)
  const rsaUs = rsaVerifyMicros(key.jwk, jwts[0])
  console.log(`signed ${jwts.length} RS256 tokens in ${Date.now() - t0} ms; one RS256 signature check here: ${fmt.us(rsaUs)} µs; issuer ${ctx.issuer.issuer}`)

  const passes = []
  const failures = []
  for (const store of stores) passes.push(await runPass(ctx, store, phasesFor(store), failures))
  const issuerStats = await getJson(`${ctx.issuer.url}/stats`).catch(() => undefined)
  const elapsed = (Date.now() - started) / 1000

  // ---- report
  const sections = passes.map((pass) => `### ${pass.store === 'redis' ? 'Redis store (REDIS_URL: a private redis-server on the subject core)' : 'In-process store (no REDIS_URL)'}\n\n` +
    `${table(pass)}\n\n${summary(pass, rsaUs)}${pass.notes.map((n) => `\n- ${n}`).join('')}`)
  const md = resultsFile({ passes, failures, sections, stores, elapsed, pinText, build, rsaUs, issuerStats })
  console.log(`\n${sections.join('\n\n')}\n`)
  for (const f of failures) console.log(`FAILED: ${f}`)
  mkdirSync(path.dirname(S.out), { recursive: true })
  writeFileSync(S.out, md)
  console.log(`wrote ${path.relative(process.cwd(), S.out)} (run time ${elapsed.toFixed(0)} s)`)
  if (S.json) writeFileSync(S.json, JSON.stringify({ rsaUs, passes: passes.map((p) => ({ store: p.store, rows: p.rows, results: p.results, notes: p.notes })), failures }, null, 2))
  await stopAll()
  if (failures.length) process.exitCode = 1
}

main().catch((err) => {
  process.stderr.write(err instanceof UsageError ? `bench:auth-flood: ${err.message}\n` : `bench:auth-flood failed: ${err.stack ?? err.message}\n`)
  process.exit(1)
})
