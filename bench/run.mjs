#!/usr/bin/env node
// `npm run bench`: what the gateway costs, as ratios against baselines
// measured in the same run. See bench/README.md.
//
//   load generator (autocannon / ws clients, in this process)   pinned to CPU A
//   app, issuer, proxies, gateways, private redis-servers         pinned to CPU B, one process each
//
// Four parts, each optional:
//   1. HTTP: every subject once per round, rounds interleaved, each run =
//      warm-up then measurement; medians over rounds. CPU µs/request =
//      utime+stime of the subject's process during the measurement / responses.
//      Rate-limit rows: gateway-nolimit (exempt), gateway (in-process store),
//      gateway-redis (private Redis).
//   2. Redis down: a gateway on its own private Redis, measured with Redis up,
//      hung (SIGSTOP) and dead (SIGKILL).
//   3. WebSocket echo: round trips/s and latency, direct vs plain proxy vs
//      gateway, interleaved rounds like (1).
//   4. WebSocket memory: RSS per idle connection with BENCH_WS_CONNECTIONS open,
//      gateway vs the app directly, fresh processes.
//
// Env: see the `S` table below and bench/README.md.
import { cpSync, mkdtempSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync, existsSync, readFileSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { randomUUID } from 'node:crypto'
import autocannon from 'autocannon'
import { SignJWT, calculateJwkThumbprint, exportJWK, exportSPKI, generateKeyPair } from 'jose'
import {
  busySeconds, cpuSeconds, describeTail, freePorts, installCleanup, openFilesLimit, rssKiB, setupPinning, spawnNode, stopAll, stopChild,
  hasCommand, spawnProcess, waitHello, waitHttpOk
} from './lib/children.mjs'
import { HAPROXY_HEALTH, haproxyConfig } from './subjects/haproxy.mjs'
import { redisCommandStats, redisCommandsProcessed, redisServerVersion, startRedis } from './lib/redis.mjs'
import { closeAll, echoRun, openIdle, openWs } from './lib/ws-load.mjs'
import { openLoop, quantile } from './lib/open-loop.mjs'

const BENCH_DIR = path.dirname(fileURLToPath(import.meta.url))
const ROOT = path.resolve(BENCH_DIR, '..')
/** The gateway build under test: this checkout's dist/, or BENCH_DIST (e.g. an older build, for before/after figures). */
const DIST = process.env.BENCH_DIST ? path.resolve(process.env.BENCH_DIST) : path.join(ROOT, 'dist')
/**
 * Every gateway of a run starts from a copy of dist/ taken when the run
 * starts (inside bench/, so node_modules still resolves): other work that
 * rebuilds dist/ mid-run cannot mix two builds into one set of tables.
 */
const SNAPSHOT_PREFIX = '.dist-snapshot-'
const SNAPSHOT = path.join(BENCH_DIR, `${SNAPSHOT_PREFIX}${process.pid}`)
const GATEWAY_ENTRY = path.join(SNAPSHOT, 'server.js')
const APP_SCRIPT = path.join(BENCH_DIR, 'subjects/app.mjs')
const PLAIN_PROXY_SCRIPT = path.join(BENCH_DIR, 'subjects/plain-proxy.mjs')
const MEM_PROBE = path.join(BENCH_DIR, 'lib/mem-probe.mjs')
const RESULTS_FILE = path.join(BENCH_DIR, 'results/latest.md')
const REALM = 'bench'
const AUDIENCE = 'resonance-gateway'
const CLIENT_ID = 'resonance-web'
const REQUEST_PATH = '/api/resonance/items/'
const WS_PATH = '/api/resonance/ws'
const BASELINE = 'plain-proxy'
/** The C peer of the HTTP table (second set of ratios), when `haproxy` is installed. */
const PEER = 'haproxy'
const WS_BASELINE = 'direct'
/** Realm role every bench token carries; only gateway-nolimit's YAML makes it exempt. */
const EXEMPT_ROLE = 'bench-exempt'
/** What a gateway needs so that 50 echo loops or 5 connections per user are never refused. */
const WS_GATEWAY_ENV = { WS_MESSAGE_LIMIT_MAX: '1000000000', WS_MAX_CONNECTIONS_PER_USER: '1000' }
/** Responses slower than this are counted in the Redis-down table. */
const SLOW_MS = 250

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

function envFlag (name, def) {
  const raw = process.env[name]?.trim().toLowerCase()
  if (raw === undefined || raw === '') return def
  if (['1', 'true', 'yes', 'on'].includes(raw)) return true
  if (['0', 'false', 'no', 'off'].includes(raw)) return false
  process.stderr.write(`bench: ${name}=${process.env[name]}: must be 0 or 1\n`)
  process.exit(2)
}

function envList (name) {
  return process.env[name]?.split(',').map((s) => s.trim()).filter(Boolean)
}

const S = {
  // 1. HTTP
  http: envFlag('BENCH_HTTP', true),
  duration: envNumber('BENCH_DURATION', 8, { min: 1 }),
  warmup: envNumber('BENCH_WARMUP', 3),
  prime: envNumber('BENCH_PRIME', 5),
  rounds: envNumber('BENCH_ROUNDS', 3, { min: 1, integer: true }),
  connections: envNumber('BENCH_CONNECTIONS', 64, { min: 1, integer: true }),
  tokens: envNumber('BENCH_TOKENS', 1000, { min: 1, integer: true }),
  // A folder: every proxy/gateway subject runs with --cpu-prof and writes <name>.cpuprofile there on exit.
  profileDir: process.env.BENCH_PROFILE ? path.resolve(process.env.BENCH_PROFILE) : null,
  // 1b. fixed rate (open loop) through the HTTP subjects: the latency each one adds
  rate: {
    // 'auto' (default): 40% of the slowest HTTP subject's closed-loop req/s, at most 1000: every subject
    // must have headroom, or the run measures queueing, not the latency a proxy adds.
    rps: ['', 'auto', undefined].includes(process.env.BENCH_RATE?.trim()) ? 'auto' : envNumber('BENCH_RATE', 1000, { min: 0 }),
    duration: envNumber('BENCH_RATE_DURATION', 8, { min: 1 }),
    rounds: envNumber('BENCH_RATE_ROUNDS', 2, { min: 1, integer: true }),
    // Seconds at the same rate before each measurement, discarded: right after saturation a Node process pays for
    // the heap it grew (V8's memory reducer, major GCs) in its first seconds at a light load.
    warmup: envNumber('BENCH_RATE_WARMUP', 2)
  },
  // 2. Redis down
  redisDown: {
    enabled: envFlag('BENCH_REDIS_DOWN', true),
    duration: envNumber('BENCH_REDIS_DOWN_DURATION', 6, { min: 1 }),
    // Default: 3 s when the (already primed and measured) gateway-redis HTTP subject is reused, 10 s for a fresh gateway.
    warmup: envNumber('BENCH_REDIS_DOWN_WARMUP', null)
  },
  // 3. + 4. WebSocket
  ws: {
    enabled: envFlag('BENCH_WS', true),
    echoConnections: envNumber('BENCH_WS_ECHO_CONNECTIONS', 50, { min: 1, integer: true }),
    duration: envNumber('BENCH_WS_DURATION', 5, { min: 1 }),
    warmup: envNumber('BENCH_WS_WARMUP', 2),
    prime: envNumber('BENCH_WS_PRIME', 3),
    messageBytes: envNumber('BENCH_WS_MESSAGE_BYTES', 128, { min: 1, integer: true }),
    connections: envNumber('BENCH_WS_CONNECTIONS', 5000, { integer: true }),
    batch: envNumber('BENCH_WS_BATCH', 200, { min: 1, integer: true }),
    memWarmup: envNumber('BENCH_WS_MEM_WARMUP', 200, { integer: true }),
    settle: envNumber('BENCH_WS_SETTLE', 2)
  }
}

// ------------------------------------------------------------- subjects --
//
// THE EXTENSION POINT for HTTP rows. One row per thing under load. `start(ctx)` returns
//   { url, pid, child?, others?: [{ label, pid }], extraChildren?, redis?, adminUrl? }
// where `pid` is the process whose CPU the table reports and `others` are
// extra processes whose CPU/request goes into the details (the app always;
// redis-server for Redis-backed variants). `auth: true` makes the preflight
// insist on 401 without a token and on the identity reaching the app with
// one. `limitHeaders: true/false` makes it insist that the per-user limit is
// (or is not) applied (X-RateLimit-Limit present or absent). A run with
// `redis` gets its Redis checked in preflight (it must see commands) and
// its Redis commands per request reported. `default: false` rows run only
// when named in BENCH_SUBJECTS.
//
// Gateway variants differ only in env (see gatewayEnv for the shared part).
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
    start: (ctx) => startScript(ctx, BASELINE, PLAIN_PROXY_SCRIPT, { UPSTREAM_URL: ctx.app.url })
  },
  {
    name: 'plain-proxy-pipelined',
    title: 'the plain proxy with undici pipelining 8 to the app (PROXY_PIPELINING=8)',
    auth: false,
    default: false,
    start: (ctx) => startScript(ctx, 'plain-proxy-pipelined', PLAIN_PROXY_SCRIPT, { UPSTREAM_URL: ctx.app.url, PROXY_PIPELINING: '8' })
  },
  {
    // The gateway's own proxy tuning on the plain proxy: how much of the gap to the gateway is tuning, not auth.
    name: 'plain-proxy-tuned',
    title: 'the plain proxy with the gateway\'s proxy tuning: answers of up to 16 KiB sent as one Buffer, reply-from URL cache off (PROXY_BUFFER_BYTES=16384, PROXY_DISABLE_CACHE=1)',
    auth: false,
    default: false,
    start: (ctx) => startScript(ctx, 'plain-proxy-tuned', PLAIN_PROXY_SCRIPT, { UPSTREAM_URL: ctx.app.url, PROXY_BUFFER_BYTES: '16384', PROXY_DISABLE_CACHE: '1' })
  },
  {
    // policyFor() returns null for an exempt caller, so @fastify/rate-limit's
    // allowList short-circuits before the store: no counter, no X-RateLimit-*
    // headers. Everything else (auth, token cache, revocation check, proxy,
    // metrics, the limiter's hook itself) still runs.
    name: 'gateway-nolimit',
    title: `gateway, auth on, callers exempt from rate limits (YAML \`rateLimit.exempt.roles: [${EXEMPT_ROLE}]\`, a realm role every bench token carries): no limit-store work per request`,
    auth: true,
    limitHeaders: false,
    default: true,
    start: (ctx) => startGateway(ctx, 'gateway-nolimit', { CONFIG_FILE: ctx.exemptConfig })
  },
  {
    name: 'gateway',
    title: 'gateway, auth on, per-user rate limit in the in-process store (no REDIS_URL), otherwise default settings',
    auth: true,
    limitHeaders: true,
    default: true,
    start: (ctx) => startGateway(ctx, 'gateway', {})
  },
  {
    name: 'gateway-redis',
    title: 'gateway, auth on, per-user rate limit in Redis (REDIS_URL = the bench\'s private redis-server, pinned with the subjects)',
    auth: true,
    limitHeaders: true,
    needsRedis: true,
    default: true,
    start: (ctx) => startGatewayWithRedis(ctx, 'gateway-redis', 'redis', {})
  },
  {
    // The C peer: HAProxy's own JWT path (bench/subjects/haproxy.mjs writes the config).
    name: 'haproxy',
    title: 'HAProxy (Debian `haproxy`, one thread): `jwt_verify` RS256 with the issuer\'s public key PEM, alg/iss/aud/exp checks, a per-`sub` stick table (http_req_rate) with a deny rule, X-User-Sub set; skipped when `haproxy` is not installed',
    auth: true,
    default: true,
    requires: 'haproxy',
    start: (ctx) => startHaproxy(ctx, 'haproxy')
  },
  {
    // Every request pays the RS256 signature check (no fast-jwt verify cache).
    name: 'gateway-nocache',
    title: 'gateway, auth on, JWT_CACHE_SIZE=0',
    auth: true,
    limitHeaders: true,
    default: false,
    start: (ctx) => startGateway(ctx, 'gateway-nocache', { JWT_CACHE_SIZE: '0' })
  }
]

// WebSocket echo rows (BENCH_WS_SUBJECTS). `start` returns { url (http base), pid, child?, others }.
const WS_SUBJECTS = [
  {
    name: 'direct',
    title: 'the app\'s `ws` echo server, no proxy (baseline for the ratios)',
    auth: false,
    default: true,
    start: (ctx) => ({ url: ctx.app.url, pid: ctx.app.pid, child: ctx.app.child, others: [] })
  },
  {
    name: 'plain-proxy',
    title: '@fastify/http-proxy with `websocket: true`, no auth (the HTTP baseline process)',
    auth: false,
    default: true,
    start: (ctx) => ctx.httpRuns.get(BASELINE) ?? startScript(ctx, BASELINE, PLAIN_PROXY_SCRIPT, { UPSTREAM_URL: ctx.app.url })
  },
  {
    name: 'gateway',
    title: 'gateway, auth on (token in `?access_token=`), in-process limit store, `WS_MESSAGE_LIMIT_MAX=1000000000`, `WS_MAX_CONNECTIONS_PER_USER=1000`, other WS settings default',
    auth: true,
    default: true,
    start: (ctx) => startGateway(ctx, 'gateway-ws', WS_GATEWAY_ENV)
  },
  {
    name: 'gateway-redis',
    title: 'the same with REDIS_URL (message limit and connection slots in the private Redis)',
    auth: true,
    needsRedis: true,
    default: false,
    start: (ctx) => startGatewayWithRedis(ctx, 'gateway-ws-redis', 'redis-ws', WS_GATEWAY_ENV)
  }
]

// WebSocket memory targets (BENCH_WS_MEM_SUBJECTS): always fresh processes,
// started with --expose-gc and the memory probe, stopped after their run.
const MEM_TARGETS = [
  {
    name: 'direct',
    title: 'a fresh app process (its `ws` echo server), no proxy',
    auth: false,
    default: true,
    start: async (ctx) => {
      const app = await startApp(ctx, 'app-wsmem', { execArgv: memArgv() })
      return { url: app.url, pid: app.pid, child: app.child, stop: [app.child] }
    }
  },
  {
    name: 'gateway',
    title: 'a fresh gateway (settings as the WS echo gateway) in front of a fresh app',
    auth: true,
    default: true,
    start: async (ctx) => {
      const app = await startApp(ctx, 'app-wsmem-upstream', { execArgv: memArgv() })
      const gw = await startGateway(ctx, 'gateway-wsmem', WS_GATEWAY_ENV, { upstream: app.url, execArgv: memArgv() })
      return { ...gw, upstream: app, stop: [gw.child, app.child] }
    }
  },
  {
    name: 'plain-proxy',
    title: 'a fresh @fastify/http-proxy (`websocket: true`) in front of a fresh app',
    auth: false,
    default: false,
    start: async (ctx) => {
      const app = await startApp(ctx, 'app-wsmem-upstream', { execArgv: memArgv() })
      const px = await startScript(ctx, 'plain-proxy-wsmem', PLAIN_PROXY_SCRIPT, { UPSTREAM_URL: app.url }, { execArgv: memArgv() })
      return { ...px, upstream: app, stop: [px.child, app.child] }
    }
  }
]

function memArgv () { return ['--expose-gc', '--import', pathToFileURL(MEM_PROBE).href] }

/** The environment every gateway variant shares; variants add or override keys. */
function gatewayEnv (ctx, ports, upstream) {
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
    UPSTREAM_URL: upstream,
    // 1000 users at thousands of req/s would exceed any realistic per-user
    // limit; the bench measures the limiter's cost, never its 429s.
    RATE_LIMIT_MAX: '1000000000',
    SHUTDOWN_DELAY: '0'
  }
}

/** --cpu-prof arguments when BENCH_PROFILE names a folder (the profile is written when the process exits). */
function profileArgv (name) {
  if (!S.profileDir) return []
  mkdirSync(S.profileDir, { recursive: true })
  return ['--cpu-prof', `--cpu-prof-dir=${S.profileDir}`, `--cpu-prof-name=${name}.cpuprofile`]
}

async function startGateway (ctx, name, extraEnv, { upstream = ctx.app.url, execArgv = [] } = {}) {
  execArgv = [...execArgv, ...profileArgv(name)]
  const [port, adminPort] = await freePorts(2)
  const child = spawnNode(name, GATEWAY_ENTRY, { cwd: ROOT, execArgv, env: { ...gatewayEnv(ctx, { port, adminPort }, upstream), ...extraEnv }, pin: ctx.pin })
  const adminUrl = `http://127.0.0.1:${adminPort}`
  // /readyz is 200 once the JWKS is loaded (and, with REDIS_URL, Redis answers PING).
  await waitHttpOk(child, `${adminUrl}/readyz`)
  return { url: `http://127.0.0.1:${port}`, pid: child.pid, child, adminUrl, others: [{ label: 'app', pid: ctx.app.pid }] }
}

async function startGatewayWithRedis (ctx, name, redisName, extraEnv) {
  const redis = await ctx.startRedis(redisName)
  const run = await startGateway(ctx, name, { REDIS_URL: redis.url, ...extraEnv })
  run.others.push({ label: 'redis', pid: redis.pid })
  run.extraChildren = [redis.child]
  run.redis = redis
  return run
}

async function startScript (ctx, name, script, extraEnv, { execArgv = [] } = {}) {
  execArgv = [...execArgv, ...profileArgv(name)]
  const child = spawnNode(name, script, { cwd: ROOT, execArgv, env: { ...ctx.cleanEnv, ...extraEnv }, pin: ctx.pin })
  const { port } = await waitHello(child)
  return { url: `http://127.0.0.1:${port}`, pid: child.pid, child, others: [{ label: 'app', pid: ctx.app.pid }] }
}

async function startHaproxy (ctx, name) {
  const [port] = await freePorts(1)
  const dir = mkdtempSync(path.join(ctx.tmp, 'haproxy-'))
  const pem = path.join(dir, 'issuer-public.pem')
  writeFileSync(pem, ctx.publicKeyPem)
  const cfg = path.join(dir, 'haproxy.cfg')
  writeFileSync(cfg, haproxyConfig({ port, upstream: ctx.app.url, issuer: ctx.issuer.issuer, audience: AUDIENCE, pem }))
  const child = spawnProcess(name, 'haproxy', ['-db', '-f', cfg], { cwd: dir, env: ctx.cleanEnv, pin: ctx.pin, pdeathsig: true })
  await waitHttpOk(child, `http://127.0.0.1:${port}${HAPROXY_HEALTH}`)
  return { url: `http://127.0.0.1:${port}`, pid: child.pid, child, others: [{ label: 'app', pid: ctx.app.pid }] }
}

async function startApp (ctx, name, { execArgv = [] } = {}) {
  const child = spawnNode(name, APP_SCRIPT, { cwd: ROOT, execArgv, env: ctx.cleanEnv, pin: ctx.pin })
  const { port } = await waitHello(child)
  return { url: `http://127.0.0.1:${port}`, pid: child.pid, child }
}

// --------------------------------------------------------------- tokens --

async function makeKey () {
  const { publicKey, privateKey } = await generateKeyPair('RS256', { modulusLength: 2048 })
  const jwk = await exportJWK(publicKey)
  jwk.kid = await calculateJwkThumbprint(jwk)
  jwk.alg = 'RS256'
  jwk.use = 'sig'
  return { privateKey, jwk, publicKeyPem: await exportSPKI(publicKey) }
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
      // EXEMPT_ROLE means nothing unless a gateway's YAML names it (gateway-nolimit).
      realm_access: { roles: ['default-roles-bench', 'offline_access', 'user', EXEMPT_ROLE] },
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
 * samples (autocannon's histogram has 1 ms resolution) and the longest time
 * without any response (all connections stuck: a stall).
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
    const t0 = performance.now()
    let last = t0
    let maxGap = 0
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
      maxGap = Math.max(maxGap, performance.now() - last)
      resolve({ result, latencies, maxGap })
    })
    if (latencies) {
      current.on('response', (_client, _status, _bytes, ms) => {
        latencies.add(ms)
        const now = performance.now()
        if (now - last > maxGap) maxGap = now - last
        last = now
      })
    }
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

  max () { return this.n === 0 ? NaN : this.a.subarray(0, this.n).reduce((m, x) => (x > m ? x : m), 0) }
  countAtLeast (ms) { return this.a.subarray(0, this.n).reduce((c, x) => (x >= ms ? c + 1 : c), 0) }
}

/**
 * CPU accounting around a measured window: utime+stime of each process, the
 * load generator (this process), and busy time of the cores from /proc/stat,
 * whose excess over the bench's own processes is the noise from other users.
 */
function cpuWindow (pids, pin) {
  const before = pids.map((p) => cpuSeconds(p.pid))
  const cores = pin.applied ? [pin.subjectCpu, pin.loadgenCpu] : [undefined]
  const busy0 = cores.map(busySeconds)
  const lg0 = process.cpuUsage()
  const t0 = process.hrtime.bigint()
  return {
    stop () {
      const wall = Number(process.hrtime.bigint() - t0) / 1e9
      const busy1 = cores.map(busySeconds)
      const after = pids.map((p) => cpuSeconds(p.pid))
      const lg = process.cpuUsage(lg0)
      const loadgenCpuPct = (lg.user + lg.system) / 1e6 / wall * 100
      return {
        wall,
        loadgenCpuPct,
        /** Per-process CPU per unit of work (request, round trip) and the noise. */
        summarize (total) {
          const cpu = pids.map((p, i) => {
            const sec = before[i] === undefined || after[i] === undefined ? undefined : after[i] - before[i]
            return { label: p.label, usPerReq: sec === undefined || total === 0 ? undefined : sec * 1e6 / total, pct: sec === undefined ? undefined : sec / wall * 100 }
          })
          const subjectSide = cpu.reduce((sum, c) => sum + (c.pct ?? 0), 0)
          const busyPct = busy0.map((b, i) => (b === undefined || busy1[i] === undefined ? undefined : (busy1[i] - b) / wall * 100))
          const foreign = (pct, ours) => (pct === undefined ? undefined : Math.max(0, pct - ours))
          const noise = pin.applied
            ? { subjectCore: foreign(busyPct[0], subjectSide), loadgenCore: foreign(busyPct[1], loadgenCpuPct) }
            : { machine: foreign(busyPct[0], subjectSide + loadgenCpuPct) }
          return { cpu, noise }
        }
      }
    }
  }
}

/** Warm-up (discarded) then the measured run, with CPU read around the latter. */
async function measure (subject, run, tokens, warmupSeconds, pin, seconds = S.duration) {
  let warmupBad = 0
  if (warmupSeconds > 0) {
    const w = await runLoad(run.url, tokens, warmupSeconds, { recordLatency: false })
    warmupBad = w.result.non2xx + w.result.errors + w.result.timeouts
  }
  const pids = [{ label: 'subject', pid: run.pid }, ...run.others]
  const redisCmds0 = run.redis && !run.redisStatsOff ? await redisCommandStats(run.redis.port) : undefined
  const win = cpuWindow(pids, pin)
  const { result, latencies, maxGap } = await runLoad(run.url, tokens, seconds, { recordLatency: true })
  const snap = win.stop()
  const redisCmds1 = redisCmds0 !== undefined ? await redisCommandStats(run.redis.port) : undefined
  const total = result.requests.total
  const { cpu, noise } = snap.summarize(total)
  const [p50, p99] = latencies.percentiles(0.5, 0.99)
  return {
    subject: subject.name,
    rps: total / result.duration,
    total,
    p50,
    p99,
    max: latencies.max(),
    slow: latencies.countAtLeast(SLOW_MS),
    maxGap,
    cpuUsPerReq: cpu[0].usPerReq,
    cpuPct: cpu[0].pct,
    rssKiB: rssKiB(run.pid), // after the measurement: a process that keeps growing round after round leaks
    others: cpu.slice(1),
    loadgenCpuPct: snap.loadgenCpuPct,
    noise,
    // Redis calls per request by command (INFO itself excluded), e.g. { evalsha: 1, incr: 1, pttl: 1 }.
    redisCmdsPerReq: redisCmds1 !== undefined && total > 0
      ? Object.fromEntries(Object.entries(redisCmds1).filter(([k]) => k !== 'info').map(([k, v]) => [k, (v - (redisCmds0[k] ?? 0)) / total]).filter(([, v]) => v > 0.005))
      : undefined,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    statusCodes: Object.fromEntries(Object.entries(result.statusCodeStats).map(([k, v]) => [k, v.count])),
    warmupBad
  }
}

// ------------------------------------------------------------ preflight --

/** Requests before any load: proves the path works (and that auth and the limit are really on or off). */
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
  const limit = res.headers.get('x-ratelimit-limit')
  if (subject.limitHeaders === true && limit === null) fail('no X-RateLimit-Limit header: the per-user rate limit is not applied')
  if (subject.limitHeaders === false && limit !== null) fail(`X-RateLimit-Limit: ${limit}: the caller is not exempt from the rate limit`)
  if (run.redis) {
    // 20 requests must reach Redis (at least one command each), or REDIS_URL is silently not in use.
    const before = await redisCommandsProcessed(run.redis.port)
    for (let i = 0; i < 20; i++) await (await fetch(`${run.url}${REQUEST_PATH}preflight`, { headers: { authorization: `Bearer ${t.jwt}` } })).arrayBuffer()
    const after = await redisCommandsProcessed(run.redis.port)
    if (!(after - before >= 20)) fail(`the private Redis saw ${after - before} commands for 20 requests: the limit store is not Redis`)
  }
  return Buffer.byteLength(body)
}

function wsUrlFor (run, auth, tokens) {
  const base = run.url.replace(/^http/, 'ws') + WS_PATH
  return auth ? (i) => `${base}?access_token=${tokens[i % tokens.length].jwt}` : () => base
}

/** One WebSocket connection with one echo; with auth, an upgrade without a token must get 401. */
async function wsPreflight (subject, run, tokens, { checkAnon = true } = {}) {
  const fail = (why) => { throw new Error(`WebSocket preflight ${subject.name}: ${why}\n${run.child ? describeTail(run.child) : ''}`) }
  const r = await openIdle(wsUrlFor(run, subject.auth, tokens), 1, { payload: 'preflight' })
  if (r.sockets.length !== 1) fail(`could not open a connection and get an echo: ${[...r.failures.keys()].join(', ')}`)
  await closeAll(r.sockets)
  if (subject.auth && checkAnon) {
    try {
      const ws = await openWs(run.url.replace(/^http/, 'ws') + WS_PATH)
      await closeAll([ws])
      fail('an upgrade without a token was accepted: auth is not on')
    } catch (err) {
      if (err.reason !== 'HTTP 401') throw err.reason ? new Error(`WebSocket preflight ${subject.name}: expected 401 without a token, got ${err.reason}`) : err
    }
  }
}

// -------------------------------------------------------------- helpers --

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

function median (xs) {
  const v = xs.filter((x) => x !== undefined && Number.isFinite(x)).sort((a, b) => a - b)
  if (v.length === 0) return undefined
  const m = v.length >> 1
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2
}

const fmt = {
  int: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : Math.round(x).toLocaleString('en-US')),
  ms: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(2)),
  us: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(0)),
  ratio: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : `${x.toFixed(2)}×`),
  pct: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : `${x.toFixed(0)}%`),
  mib: (kib) => (kib === undefined || !Number.isFinite(kib) ? 'n/a' : (kib / 1024).toFixed(1)),
  kib: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(1)),
  n2: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(2))
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

/** Copies dist/ to SNAPSHOT (removed on exit; stale copies of dead runs are removed here). */
function snapshotDist () {
  for (const name of readdirSync(BENCH_DIR)) {
    if (!name.startsWith(SNAPSHOT_PREFIX)) continue
    const pid = Number(name.slice(SNAPSHOT_PREFIX.length))
    let alive = false
    try { process.kill(pid, 0); alive = true } catch (err) { alive = err.code === 'EPERM' }
    if (!alive) rmSync(path.join(BENCH_DIR, name), { recursive: true, force: true })
  }
  const git = process.env.BENCH_DIST ? `BENCH_DIST=${DIST}` : gitDescribe()
  const at = statSync(path.join(DIST, 'server.js')).mtime.toISOString()
  cpSync(DIST, SNAPSHOT, { recursive: true, filter: (src) => !src.endsWith('.map') })
  process.on('exit', () => rmSync(SNAPSHOT, { recursive: true, force: true }))
  return { git, at }
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

function fmtReasons (map) {
  return [...map].map(([r, c]) => `${r} ×${c}`).join(', ')
}

function banner (text) {
  const line = '!'.repeat(78)
  return `\n${line}\n!! ${text.split('\n').join('\n!! ')}\n${line}\n`
}

/** A metric's value from the admin /metrics (summed over label sets), or undefined. */
async function metricValue (adminUrl, name) {
  try {
    const text = await (await fetch(`${adminUrl}/metrics`, { signal: AbortSignal.timeout(2000) })).text()
    let sum
    for (const line of text.split('\n')) {
      if (line.startsWith(name + ' ') || line.startsWith(name + '{')) sum = (sum ?? 0) + Number(line.slice(line.lastIndexOf(' ') + 1))
    }
    return sum
  } catch {
    return undefined
  }
}

async function readyzStatus (adminUrl) {
  try {
    const res = await fetch(`${adminUrl}/readyz`, { signal: AbortSignal.timeout(1000) })
    await res.arrayBuffer()
    return res.status
  } catch (err) {
    return err.cause?.code ?? err.name
  }
}

/** Asks a process started with memArgv() for a GC and its memory; RSS from /proc after the GC. */
function memProbe (child, timeoutMs = 5_000) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => { child.lineListeners.delete(listen); resolve({ rssKiB: rssKiB(child.pid), gc: false, probe: 'no answer' }) }, timeoutMs)
    const listen = (line) => {
      if (!line.startsWith('{"benchMem"')) return
      clearTimeout(timer)
      child.lineListeners.delete(listen)
      const m = JSON.parse(line).benchMem
      resolve({ rssKiB: rssKiB(child.pid), heapUsed: m.heapUsed, external: m.external, arrayBuffers: m.arrayBuffers, gc: m.gc })
    }
    child.lineListeners.add(listen)
    try { child.kill('SIGUSR2') } catch {}
  })
}

/** The stdout lines a child logged during the run, summarised by message. */
function logSummary (child) {
  const counts = new Map()
  for (const line of child.lines) {
    let msg = line.slice(0, 120)
    try { const j = JSON.parse(line); msg = `${j.level >= 50 ? 'error' : j.level >= 40 ? 'warn' : 'info'}: ${j.msg}` } catch {}
    counts.set(msg, (counts.get(msg) ?? 0) + 1)
  }
  return [...counts].map(([m, c]) => `"${m}" ×${c}`).join('; ')
}

// ----------------------------------------------------------------- phases --

/** Any child dying from now on invalidates the run. */
function makeWatch () {
  const w = { died: undefined }
  w.add = (child) => {
    if (!child) return
    child.steady = true
    child.onUnexpectedExit = (c) => { w.died ??= `${c.benchName} exited (${c.exitInfo}) during the run\n${describeTail(c)}`; current?.stop() }
  }
  w.check = () => { if (w.died) throw new Error(w.died) }
  return w
}

async function httpPhase (ctx, subjects, tokens, watch) {
  const runs = ctx.httpRuns
  let bodyBytes
  for (const s of subjects) {
    const run = await s.start(ctx)
    bodyBytes = await preflight(s, run, tokens)
    runs.set(s.name, run)
    for (const c of [run.child, ...(run.extraChildren ?? [])]) watch.add(c)
    console.log(`started ${s.name} (pid ${run.pid}${run.redis ? `, redis pid ${run.redis.pid} port ${run.redis.port}` : ''}) at ${run.url}: preflight ok` +
      `${s.auth ? ' (401 without a token, identity forwarded' : ''}${s.limitHeaders === true ? ', limit applied' : s.limitHeaders === false ? ', caller exempt' : ''}${s.auth ? ')' : ''}` +
      `${run.redis ? ', Redis in use' : ''}`)
  }
  if (S.prime > 0) {
    for (const s of subjects) {
      console.log(`priming ${s.name} for ${S.prime} s`)
      await runLoad(runs.get(s.name).url, tokens, S.prime, { recordLatency: false })
      watch.check()
    }
  }
  const results = [] // per round, per subject
  for (let round = 1; round <= S.rounds; round++) {
    // Rotate the order each round so no subject always runs first or last.
    const order = subjects.map((_s, i) => subjects[(i + round - 1) % subjects.length])
    for (const s of order) {
      const m = await measure(s, runs.get(s.name), tokens, S.warmup, ctx.pin)
      watch.check()
      m.round = round
      results.push(m)
      const bad = m.non2xx + m.errors + m.timeouts
      console.log(`round ${round}/${S.rounds} ${s.name.padEnd(16)} ${fmt.int(m.rps).padStart(7)} req/s  p50 ${fmt.ms(m.p50)} ms  p99 ${fmt.ms(m.p99)} ms  ` +
        `${fmt.us(m.cpuUsPerReq)} µs/req (${fmt.pct(m.cpuPct)} CPU)${m.others.filter((o) => o.label !== 'app').map((o) => `  ${o.label} ${fmt.us(o.usPerReq)} µs/req`).join('')}` +
        `  RSS ${fmt.mib(m.rssKiB)} MiB  load generator ${fmt.pct(m.loadgenCpuPct)}  other load ${fmtNoise(m.noise)}${bad ? `  NON-2XX/ERRORS: ${bad}` : ''}`)
    }
  }
  // ---- aggregate: medians over rounds; ratios per round (same conditions), then their median
  const byRound = (name) => results.filter((r) => r.subject === name)
  const baselineRounds = new Map(byRound(BASELINE).map((r) => [r.round, r]))
  const peerRounds = new Map(byRound(PEER).map((r) => [r.round, r]))
  const rows = subjects.map((s) => {
    const rs = byRound(s.name)
    const ratioTo = (base, f) => (base.size === 0
      ? undefined
      : median(rs.map((r) => { const b = base.get(r.round); return b && f(b) ? f(r) / f(b) : undefined })))
    const ratio = (f) => ratioTo(baselineRounds, f)
    return {
      name: s.name,
      title: s.title,
      rps: median(rs.map((r) => r.rps)),
      p50: median(rs.map((r) => r.p50)),
      p99: median(rs.map((r) => r.p99)),
      cpu: median(rs.map((r) => r.cpuUsPerReq)),
      rpsRatio: ratio((r) => r.rps),
      cpuRatio: ratio((r) => r.cpuUsPerReq),
      // Against HAProxy's JWT path, same round: req/s and p99 as "higher is better" (peer p99 / ours).
      peer: peerRounds.size === 0
        ? undefined
        : { rps: ratioTo(peerRounds, (r) => r.rps), cpu: ratioTo(peerRounds, (r) => r.cpuUsPerReq), p99: ratioTo(peerRounds, (r) => 1 / r.p99) },
      bad: rs.reduce((n, r) => n + r.non2xx + r.errors + r.timeouts, 0),
      warmupBad: rs.reduce((n, r) => n + r.warmupBad, 0),
      loadgen: median(rs.map((r) => r.loadgenCpuPct)),
      cpuPct: median(rs.map((r) => r.cpuPct)),
      cpuRange: [Math.min(...rs.map((r) => r.cpuUsPerReq ?? NaN)), Math.max(...rs.map((r) => r.cpuUsPerReq ?? NaN))],
      redisCmdsPerReq: rs.find((r) => r.redisCmdsPerReq !== undefined)
        ? Object.fromEntries([...new Set(rs.flatMap((r) => Object.keys(r.redisCmdsPerReq ?? {})))].map((k) => [k, median(rs.map((r) => r.redisCmdsPerReq?.[k] ?? 0))]))
        : undefined,
      others: [...new Set(rs.flatMap((r) => r.others.map((o) => o.label)))].map((label) => ({
        label, usPerReq: median(rs.map((r) => r.others.find((o) => o.label === label)?.usPerReq))
      }))
    }
  })
  return { rows, results, bodyBytes }
}

function httpTable (rows) {
  const peer = rows.some((r) => r.peer !== undefined)
  const lines = [
    '| subject | req/s | p50 ms | p99 ms | CPU µs/req (subject process) | req/s vs plain proxy | CPU/req vs plain proxy |' +
      (peer ? ' req/s vs HAProxy | CPU/req vs HAProxy | p99 vs HAProxy (HAProxy p99 / row p99) |' : '') + ' non-2xx |',
    '|---|---:|---:|---:|---:|---:|---:|' + (peer ? '---:|---:|---:|' : '') + '---:|'
  ]
  for (const r of rows) {
    lines.push(`| ${r.name} | ${fmt.int(r.rps)} | ${fmt.ms(r.p50)} | ${fmt.ms(r.p99)} | ${fmt.us(r.cpu)} | ${fmt.ratio(r.rpsRatio)} | ${fmt.ratio(r.cpuRatio)} |` +
      (peer ? ` ${fmt.ratio(r.peer?.rps)} | ${fmt.ratio(r.peer?.cpu)} | ${fmt.ratio(r.peer?.p99)} |` : '') +
      ` ${r.bad === 0 ? '0' : `**${r.bad}**`} |`)
  }
  return lines.join('\n')
}

/** Lines under the HTTP table: Redis's own CPU per request (not in the subject column) and commands per request. */
function httpNotes (rows) {
  const notes = []
  for (const r of rows) {
    const redis = r.others.find((o) => o.label === 'redis')
    if (redis) {
      notes.push(`${r.name}: plus **${fmt.us(redis.usPerReq)} µs/req in redis-server** (median; not in the subject column), ` +
        `i.e. ${fmt.us((r.cpu ?? NaN) + (redis.usPerReq ?? NaN))} µs/req gateway + Redis; Redis calls per request (INFO commandstats, Lua-internal calls included): ${r.redisCmdsPerReq ? Object.entries(r.redisCmdsPerReq).filter(([, v]) => v >= 0.005).map(([k, v]) => `${k} ${fmt.n2(v)}`).join(', ') : 'n/a'}. ` +
        'redis-server shares the subject core, so its CPU also lowers the row\'s req/s.')
    }
  }
  const lim = rows.find((r) => r.name === 'gateway')
  const nolim = rows.find((r) => r.name === 'gateway-nolimit')
  const red = rows.find((r) => r.name === 'gateway-redis')
  if (nolim?.cpu !== undefined) {
    const d = (r) => (r?.cpu === undefined ? undefined : r.cpu - nolim.cpu)
    const range = (r) => (r === undefined ? [] : [`${r.name} ${fmt.us(r.cpuRange[0])}–${fmt.us(r.cpuRange[1])}`])
    notes.push(`Limit cost per request vs gateway-nolimit (gateway process only, difference of medians): in-process store ${d(lim) === undefined ? 'n/a' : `${d(lim) >= 0 ? '+' : ''}${fmt.us(d(lim))} µs`}, ` +
      `Redis store ${d(red) === undefined ? 'n/a' : `${d(red) >= 0 ? '+' : ''}${fmt.us(d(red))} µs`} (+ redis-server's own CPU above). ` +
      `Compare with the spread over rounds, CPU µs/req min–max: ${[nolim, lim, red].flatMap(range).join(', ')}: a difference smaller than the spread is not resolved by this run.`)
  }
  return notes
}

async function ratePhase (ctx, subjects, tokens, watch) {
  const jwts = tokens.map((t) => t.jwt)
  const per = new Map(subjects.map((s) => [s.name, { lat: [], total: 0, bad: 0, cpu: [], late: 0, noise: [] }]))
  for (let round = 1; round <= S.rate.rounds; round++) {
    const order = subjects.map((_s, i) => subjects[(i + round - 1) % subjects.length])
    for (const s of order) {
      const run = ctx.httpRuns.get(s.name)
      if (S.rate.warmup > 0) await openLoop(run.url, { path: `${REQUEST_PATH}fixed-rate`, rate: S.rate.rps, seconds: S.rate.warmup, tokens: s.auth ? jwts : undefined })
      const win = cpuWindow([{ label: 'subject', pid: run.pid }, ...run.others], ctx.pin)
      const r = await openLoop(run.url, { path: `${REQUEST_PATH}fixed-rate`, rate: S.rate.rps, seconds: S.rate.duration, tokens: s.auth ? jwts : undefined })
      const { cpu, noise } = win.stop().summarize(r.sent)
      watch.check()
      const acc = per.get(s.name)
      acc.lat.push(r.latencies)
      acc.total += r.sent
      acc.bad += r.non2xx + r.errors
      acc.cpu.push(cpu[0].usPerReq)
      acc.late = Math.max(acc.late, r.lateMs)
      acc.noise.push(noise.subjectCore ?? noise.machine)
      console.log(`fixed rate round ${round}/${S.rate.rounds} ${s.name.padEnd(16)} ${fmt.int(S.rate.rps)} req/s  p50 ${fmt.ms(quantile(r.latencies, 0.5))} ms  ` +
        `p99 ${fmt.ms(quantile(r.latencies, 0.99))} ms  max ${fmt.ms(r.latencies[r.latencies.length - 1])} ms  ${fmt.us(cpu[0].usPerReq)} µs/req  other load ${fmtNoise(noise)}` +
        `${r.non2xx + r.errors ? `  NON-2XX/ERRORS: ${r.non2xx + r.errors}` : ''}`)
    }
  }
  const rows = subjects.map((s) => {
    const acc = per.get(s.name)
    const all = Float64Array.from(acc.lat.flatMap((a) => [...a])).sort()
    return {
      name: s.name,
      p50: quantile(all, 0.5),
      p90: quantile(all, 0.9),
      p99: quantile(all, 0.99),
      p999: quantile(all, 0.999),
      max: all[all.length - 1],
      cpu: median(acc.cpu),
      bad: acc.bad,
      late: acc.late,
      noise: Math.max(...acc.noise.filter((x) => Number.isFinite(x)))
    }
  })
  const direct = rows.find((r) => r.name === 'direct')
  for (const r of rows) {
    r.added50 = direct ? r.p50 - direct.p50 : undefined
    r.added99 = direct ? r.p99 - direct.p99 : undefined
  }
  return rows
}

function rateTable (rows) {
  const lines = [
    '| subject | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | added p50 ms (vs direct) | added p99 ms (vs direct) | CPU µs/req | other load (worst round) | non-2xx / errors |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    const added = (x) => (r.name === 'direct' || x === undefined ? '–' : `${x >= 0 ? '+' : ''}${fmt.ms(x)}`)
    lines.push(`| ${r.name} | ${fmt.ms(r.p50)} | ${fmt.ms(r.p90)} | ${fmt.ms(r.p99)} | ${fmt.ms(r.p999)} | ${fmt.ms(r.max)} | ${added(r.added50)} | ${added(r.added99)} | ` +
      `${fmt.us(r.cpu)} | ${fmt.pct(r.noise)} | ${r.bad === 0 ? '0' : `**${r.bad}**`} |`)
  }
  return lines.join('\n')
}

async function redisDownPhase (ctx, tokens, watch) {
  // The HTTP phase's gateway-redis (warm, and its private Redis is needed by
  // nothing else from here on: the WebSocket Redis row has its own), or a
  // fresh gateway on a fresh private Redis. RATE_LIMIT_ON_STORE_ERROR is
  // `open` in both (the default; set explicitly for a fresh one).
  const subject = { name: 'gateway-redis (Redis down)', auth: true, limitHeaders: true }
  let run = ctx.httpRuns.get('gateway-redis')
  const reused = run !== undefined
  if (!reused) {
    run = await startGatewayWithRedis(ctx, 'gateway-redis-down', 'redis-down', { RATE_LIMIT_ON_STORE_ERROR: 'open' })
    await preflight(subject, run, tokens)
    for (const c of [run.child, ...run.extraChildren]) watch.add(c)
  }
  const redis = run.redis
  run.redisStatsOff = true // INFO would hang on a stopped Redis
  const logMark = run.child.lines.length
  const warmup = S.redisDown.warmup ?? (reused ? 3 : 10)
  console.log(`redis-down: ${reused ? 'the gateway-redis HTTP subject' : 'a fresh gateway'} (pid ${run.pid}) on its private redis-server (pid ${redis.pid}, port ${redis.port}), ` +
    `RATE_LIMIT_ON_STORE_ERROR=open; warming ${warmup} s`)
  if (warmup > 0) await runLoad(run.url, tokens, warmup, { recordLatency: false })
  watch.check()

  const phases = []
  const phase = async (label) => {
    const e0 = await metricValue(run.adminUrl, 'resonance_rate_limit_store_errors_total')
    const m = await measure(subject, run, tokens, 0, ctx.pin, S.redisDown.duration)
    watch.check()
    const e1 = await metricValue(run.adminUrl, 'resonance_rate_limit_store_errors_total')
    m.label = label
    m.storeErrors = e0 === undefined || e1 === undefined ? undefined : e1 - e0
    m.degraded = await metricValue(run.adminUrl, 'resonance_rate_limit_store_degraded')
    m.readyz = await readyzStatus(run.adminUrl)
    phases.push(m)
    const bad = m.non2xx + m.errors + m.timeouts
    console.log(`redis-down ${label.padEnd(22)} ${fmt.int(m.rps).padStart(7)} req/s  p50 ${fmt.ms(m.p50)} ms  p99 ${fmt.ms(m.p99)} ms  max ${fmt.ms(m.max)} ms  ` +
      `longest gap ${fmt.ms(m.maxGap)} ms  ${fmt.us(m.cpuUsPerReq)} µs/req  RSS ${fmt.mib(m.rssKiB)} MiB  store errors ${fmt.int(m.storeErrors)}  /readyz ${m.readyz}  other load ${fmtNoise(m.noise)}${bad ? `  NON-2XX/ERRORS: ${bad}` : ''}`)
  }

  await phase('Redis up')
  redis.child.expectedExit = true
  process.kill(redis.pid, 'SIGSTOP')
  await phase('Redis hung (SIGSTOP)')
  const gone = new Promise((resolve) => (redis.child.exited ? resolve() : redis.child.once('exit', resolve)))
  process.kill(redis.pid, 'SIGKILL')
  await gone
  await phase('Redis dead (SIGKILL)')

  // Recovery (not a measured row): Redis back on the same port. Does the
  // gateway count in Redis again (a) under light continuous traffic, (b) after
  // a pause longer than the store's 1 s breaker?
  let recovery
  try {
    const t0 = performance.now()
    const back = await ctx.startRedis('redis-down-restarted', redis.port)
    watch.add(back.child)
    const scripts = async () => { const c = await redisCommandStats(back.port); return (c?.evalsha ?? 0) + (c?.eval ?? 0) }
    const oneRequest = async () => {
      const c0 = await scripts()
      const res = await fetch(`${run.url}${REQUEST_PATH}recovery`, { headers: { authorization: `Bearer ${tokens[0].jwt}` } })
      await res.arrayBuffer()
      return { status: res.status, counted: (await scripts()) > c0 }
    }
    let readyAt
    let usedAt
    let requests = 0
    while (performance.now() < t0 + 6_000 && usedAt === undefined) {
      if (readyAt === undefined && await readyzStatus(run.adminUrl) === 200) readyAt = performance.now()
      requests++
      if ((await oneRequest()).counted) usedAt = performance.now()
      else await sleep(100)
    }
    const s = (t) => `${((t - t0) / 1000).toFixed(1)} s`
    recovery = `Redis restarted on the same port: /readyz 200 after ${readyAt === undefined ? 'more than 6 s' : s(readyAt)}; ` +
      (usedAt !== undefined
        ? `with a request every ~0.1 s, requests were counted in Redis again after ${s(usedAt)}.`
        : `**with a request every ~0.1 s (${requests} requests over 6 s), none was counted in Redis: the gateway stayed on its per-process fallback** ` +
          `(resonance_rate_limit_store_degraded = ${await metricValue(run.adminUrl, 'resonance_rate_limit_store_degraded')}).`)
    if (usedAt === undefined) {
      await sleep(1_500)
      const r = await oneRequest()
      recovery += ` After 1.5 s without requests, the next request ${r.counted ? 'was counted in Redis again' : 'was still not counted in Redis'} (status ${r.status}; degraded gauge now ${await metricValue(run.adminUrl, 'resonance_rate_limit_store_degraded')}).`
    }
  } catch (err) {
    recovery = `recovery check failed: ${err.message.split('\n')[0]}`
  }
  console.log(`redis-down: ${recovery}`)
  // Its log lines belong to this table, not to the HTTP notes.
  const logs = logSummary({ lines: run.child.lines.splice(logMark) })
  await stopChild(run.child)
  return { phases, recovery, logs, reused, warmup }
}

function redisDownTable (phases) {
  const lines = [
    '| Redis | req/s | p50 ms | p99 ms | max ms | responses ≥ 250 ms | longest gap ms | CPU µs/req (gateway) | store errors | /readyz after | non-2xx | errors/timeouts | other load |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const m of phases) {
    lines.push(`| ${m.label} | ${fmt.int(m.rps)} | ${fmt.ms(m.p50)} | ${fmt.ms(m.p99)} | ${fmt.ms(m.max)} | ${fmt.int(m.slow)} | ${fmt.ms(m.maxGap)} | ${fmt.us(m.cpuUsPerReq)} | ` +
      `${fmt.int(m.storeErrors)} | ${m.readyz} | ${m.non2xx === 0 ? '0' : `**${m.non2xx}**`} | ${m.errors + m.timeouts === 0 ? '0' : `**${m.errors + m.timeouts}**`} | ${fmtNoise(m.noise)} |`)
  }
  return lines.join('\n')
}

async function wsEchoPhase (ctx, subjects, tokens, watch) {
  const runs = new Map()
  for (const s of subjects) {
    const run = await s.start(ctx)
    await wsPreflight(s, run, tokens)
    runs.set(s.name, run)
    for (const c of [run.child, ...(run.extraChildren ?? [])]) watch.add(c)
    console.log(`ws: ${s.name} (pid ${run.pid}) at ${run.url.replace(/^http/, 'ws')}${WS_PATH}: preflight ok${s.auth ? ' (echo with a token, 401 without)' : ' (echo)'}`)
  }
  const payload = 'x'.repeat(S.ws.messageBytes)
  const run1 = async (s, warmupS, measureS, record) => {
    const run = runs.get(s.name)
    const latencies = new Latencies()
    const pids = [{ label: 'subject', pid: run.pid }, ...run.others]
    let win, snap
    const r = await echoRun(wsUrlFor(run, s.auth, tokens), S.ws.echoConnections, {
      warmupS,
      measureS,
      payload,
      latencies,
      hooks: { start: () => { win = cpuWindow(pids, ctx.pin) }, end: () => { snap = win.stop() } }
    })
    watch.check()
    if (!record) return undefined
    const { cpu, noise } = snap.summarize(r.roundTrips)
    const [p50, p99] = latencies.percentiles(0.5, 0.99)
    return {
      subject: s.name,
      rtps: r.roundTrips / r.seconds,
      total: r.roundTrips,
      p50,
      p99,
      cpuUsPerRt: cpu[0].usPerReq,
      // Every subject-side process (proxy + app (+ Redis)): what one round trip costs the subject core.
      totalUsPerRt: cpu.reduce((sum, c) => sum + (c.usPerReq ?? NaN), 0),
      cpuPct: cpu[0].pct,
      others: cpu.slice(1),
      loadgenCpuPct: snap.loadgenCpuPct,
      noise,
      errors: r.errors,
      mismatches: r.mismatches
    }
  }
  if (S.ws.prime > 0) {
    for (const s of subjects) {
      console.log(`ws: priming ${s.name} for ${S.ws.prime} s`)
      await run1(s, S.ws.prime, 0.1, false)
    }
  }
  const results = []
  for (let round = 1; round <= S.rounds; round++) {
    const order = subjects.map((_s, i) => subjects[(i + round - 1) % subjects.length])
    for (const s of order) {
      const m = await run1(s, S.ws.warmup, S.ws.duration, true)
      m.round = round
      results.push(m)
      const bad = [...m.errors.values()].reduce((a, b) => a + b, 0) + m.mismatches
      console.log(`ws round ${round}/${S.rounds} ${s.name.padEnd(14)} ${fmt.int(m.rtps).padStart(7)} round trips/s  p50 ${fmt.ms(m.p50)} ms  p99 ${fmt.ms(m.p99)} ms  ` +
        `${fmt.us(m.cpuUsPerRt)} µs/rt (${fmt.pct(m.cpuPct)} CPU)  load generator ${fmt.pct(m.loadgenCpuPct)}  other load ${fmtNoise(m.noise)}` +
        `${bad ? `  ERRORS: ${fmtReasons(m.errors)}${m.mismatches ? ` mismatched echoes ${m.mismatches}` : ''}` : ''}`)
    }
  }
  const byRound = (name) => results.filter((r) => r.subject === name)
  const baseRounds = new Map(byRound(WS_BASELINE).map((r) => [r.round, r]))
  const proxyRounds = new Map(byRound(BASELINE).map((r) => [r.round, r]))
  const rows = subjects.map((s) => {
    const rs = byRound(s.name)
    return {
      name: s.name,
      title: s.title,
      rtps: median(rs.map((r) => r.rtps)),
      p50: median(rs.map((r) => r.p50)),
      p99: median(rs.map((r) => r.p99)),
      cpu: median(rs.map((r) => r.cpuUsPerRt)),
      app: median(rs.map((r) => (s.name === WS_BASELINE ? r.cpuUsPerRt : r.others.find((o) => o.label === 'app')?.usPerReq))),
      redis: median(rs.map((r) => r.others.find((o) => o.label === 'redis')?.usPerReq)),
      ratio: baseRounds.size === 0 ? undefined : median(rs.map((r) => { const b = baseRounds.get(r.round); return b && b.rtps ? r.rtps / b.rtps : undefined })),
      perCpuVsDirect: baseRounds.size === 0 ? undefined : median(rs.map((r) => { const b = baseRounds.get(r.round); return b ? b.totalUsPerRt / r.totalUsPerRt : undefined })),
      cpuVsProxy: s.name === WS_BASELINE || proxyRounds.size === 0
        ? undefined
        : median(rs.map((r) => { const b = proxyRounds.get(r.round); return b && b.cpuUsPerRt ? r.cpuUsPerRt / b.cpuUsPerRt : undefined })),
      bad: rs.reduce((n, r) => n + [...r.errors.values()].reduce((a, b) => a + b, 0) + r.mismatches, 0),
      loadgen: median(rs.map((r) => r.loadgenCpuPct))
    }
  })
  return { rows, results, runs }
}

function wsEchoTable (rows) {
  const lines = [
    '| path | round trips/s | p50 ms | p99 ms | CPU µs/round trip (proxy process) | app CPU µs/round trip | round trips/s vs direct | round trips per CPU-second vs direct | proxy CPU/round trip vs plain proxy | errors |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    lines.push(`| ${r.name} | ${fmt.int(r.rtps)} | ${fmt.ms(r.p50)} | ${fmt.ms(r.p99)} | ${r.name === WS_BASELINE ? '–' : fmt.us(r.cpu)}${r.redis !== undefined ? ` (+ Redis ${fmt.us(r.redis)})` : ''} | ` +
      `${fmt.us(r.app)} | ${fmt.ratio(r.ratio)} | ${fmt.ratio(r.perCpuVsDirect)} | ${r.name === WS_BASELINE ? '–' : fmt.ratio(r.cpuVsProxy)} | ${r.bad === 0 ? '0' : `**${r.bad}**`} |`)
  }
  return lines.join('\n')
}

async function wsMemPhase (ctx, targets, tokens, warmTokens, watch) {
  const out = []
  const n = S.ws.connections
  for (const t of targets) {
    const run = await t.start(ctx)
    await wsPreflight(t, run, tokens, { checkAnon: false })
    for (const c of run.stop) watch.add(c)
    const urlFor = wsUrlFor(run, t.auth, tokens)
    const perSub = t.auth ? Math.ceil(n / tokens.length) : undefined
    console.log(`ws memory: ${t.name} (pid ${run.pid}${run.upstream ? `, upstream app pid ${run.upstream.pid}` : ''}): warm-up ${S.ws.memWarmup} connections, then ${n} connections` +
      `${t.auth ? ` over ${Math.min(n, tokens.length)} subs (${perSub} per sub)` : ''}, ${S.ws.batch} handshakes at a time`)
    // Warm-up: the code paths (JIT), with tokens of their own so that the
    // measured connections' users still bring their per-user state (verified-
    // token cache entry, limit counters, slot map entries) into the reading.
    const warm = await openIdle(wsUrlFor(run, t.auth, warmTokens), S.ws.memWarmup, { batch: S.ws.batch })
    await closeAll(warm.sockets)
    await sleep(S.ws.settle * 1000)
    watch.check()
    const before = await memProbe(run.child)
    const upBefore = run.upstream ? await memProbe(run.upstream.child) : undefined
    const cpu0 = cpuSeconds(run.pid)
    const opened = await openIdle(urlFor, n, { batch: S.ws.batch })
    const cpuOpen = cpuSeconds(run.pid) - cpu0
    await sleep(S.ws.settle * 1000)
    watch.check()
    const after = await memProbe(run.child)
    const upAfter = run.upstream ? await memProbe(run.upstream.child) : undefined
    const gauge = run.adminUrl ? await metricValue(run.adminUrl, 'resonance_ws_connections') : undefined
    const stillOpen = opened.sockets.filter((ws) => ws.readyState === 1).length
    const closedAt = performance.now()
    await closeAll(opened.sockets)
    await sleep(1000)
    const gaugeAfterClose = run.adminUrl ? await metricValue(run.adminUrl, 'resonance_ws_connections') : undefined
    // Close handshakes (client and upstream side) finish asynchronously: read
    // again each second (up to 6 s) until the heap after GC stops shrinking.
    let afterClose = await memProbe(run.child)
    for (let i = 0; i < 5 && afterClose.heapUsed !== undefined; i++) {
      await sleep(1000)
      const next = await memProbe(run.child)
      const settled = next.heapUsed === undefined || afterClose.heapUsed - next.heapUsed < 256 * 1024
      afterClose = next
      if (settled) break
    }
    const closeSeconds = (performance.now() - closedAt) / 1000
    const logs = logSummary(run.child)
    for (const c of run.stop) await stopChild(c)
    const count = opened.sockets.length
    const r = {
      name: t.name,
      title: t.title,
      opened: count,
      stillOpen,
      failures: new Map([...warm.failures].map(([k, v]) => [`warm-up: ${k}`, v]).concat([...opened.failures])),
      closedEarly: opened.closedEarly,
      openSeconds: opened.seconds,
      cpuUsPerOpen: count ? cpuOpen * 1e6 / count : undefined,
      before,
      after,
      afterClose,
      kibPerConn: count ? (after.rssKiB - before.rssKiB) / count : undefined,
      heapKibPerConn: count && after.heapUsed !== undefined && before.heapUsed !== undefined ? (after.heapUsed - before.heapUsed) / 1024 / count : undefined,
      heapRetainedKibPerConn: count && afterClose.heapUsed !== undefined && before.heapUsed !== undefined ? (afterClose.heapUsed - before.heapUsed) / 1024 / count : undefined,
      upstreamKibPerConn: upBefore && upAfter && count ? (upAfter.rssKiB - upBefore.rssKiB) / count : undefined,
      gauge,
      gaugeAfterClose,
      closeSeconds,
      logs,
      perSub
    }
    out.push(r)
    console.log(`ws memory: ${t.name}: ${count}/${n} open in ${opened.seconds.toFixed(1)} s (${fmt.us(r.cpuUsPerOpen)} µs CPU per open), RSS ${fmt.mib(before.rssKiB)} -> ${fmt.mib(after.rssKiB)} MiB = ` +
      `${fmt.kib(r.kibPerConn)} KiB/connection (JS heap ${fmt.kib(r.heapKibPerConn)} KiB/connection after GC)` +
      `${gauge !== undefined ? `; gauge ${gauge} open, ${gaugeAfterClose} after closing` : ''}${r.failures.size ? `; FAILED: ${fmtReasons(r.failures)}` : ''}` +
      `${opened.closedEarly.size ? `; CLOSED EARLY: ${fmtReasons(opened.closedEarly)}` : ''}`)
  }
  return out
}

function wsMemTable (rows) {
  const lines = [
    '| target | connections open | RSS before MiB | RSS with connections MiB | KiB/connection (RSS) | JS heap KiB/connection (after GC) | CPU µs per open | RSS after closing MiB | JS heap still held after closing, KiB/connection | failed / closed early |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    const bad = [...r.failures.values(), ...r.closedEarly.values()].reduce((a, b) => a + b, 0)
    lines.push(`| ${r.name} | ${fmt.int(r.stillOpen)} | ${fmt.mib(r.before.rssKiB)} | ${fmt.mib(r.after.rssKiB)} | **${fmt.kib(r.kibPerConn)}** | ${fmt.kib(r.heapKibPerConn)} | ` +
      `${fmt.us(r.cpuUsPerOpen)} | ${fmt.mib(r.afterClose.rssKiB)} | ${fmt.kib(r.heapRetainedKibPerConn)} | ${bad === 0 ? '0' : `**${bad}**`} |`)
  }
  return lines.join('\n')
}

// ----------------------------------------------------------------- main --

function pick (list, envName, enabled) {
  if (!enabled) return []
  const wanted = envList(envName)
  for (const w of wanted ?? []) {
    if (!list.some((s) => s.name === w)) throw new UsageError(`${envName}: unknown name "${w}" (known: ${list.map((s) => s.name).join(', ')})`)
  }
  return list.filter((s) => {
    if (!(wanted ? wanted.includes(s.name) : s.default)) return false
    if (s.requires === undefined || hasCommand(s.requires)) return true
    if (wanted) throw new UsageError(`${envName}: "${s.name}" needs \`${s.requires}\` on PATH (Debian: apt-get install ${s.requires})`)
    console.log(`note: ${s.name} skipped: \`${s.requires}\` is not installed (Debian: apt-get install ${s.requires})`)
    return false
  })
}

async function main () {
  if (!existsSync(path.join(DIST, 'server.js'))) throw new UsageError(`${path.join(DIST, 'server.js')} not found: run \`npm run build\` (npm run bench does)`)
  const build = snapshotDist()

  const subjects = pick(SUBJECTS, 'BENCH_SUBJECTS', S.http)
  const wsSubjects = pick(WS_SUBJECTS, 'BENCH_WS_SUBJECTS', S.ws.enabled)
  const memTargets = pick(MEM_TARGETS, 'BENCH_WS_MEM_SUBJECTS', S.ws.enabled && S.ws.connections > 0)
  const needRedis = subjects.some((s) => s.needsRedis) || wsSubjects.some((s) => s.needsRedis) || S.redisDown.enabled
  const redisVersion = needRedis ? redisServerVersion() : undefined
  if (needRedis && redisVersion === undefined) {
    throw new UsageError('redis-server not found on PATH: install it, or leave out the Redis parts (BENCH_SUBJECTS without gateway-redis, BENCH_REDIS_DOWN=0)')
  }
  if (memTargets.length > 0) {
    // The gateway holds two sockets per proxied connection, the runner one.
    const need = 2 * S.ws.connections + 500
    const have = openFilesLimit()
    if (have !== undefined && have < need) {
      throw new UsageError(`BENCH_WS_CONNECTIONS=${S.ws.connections} needs an open-files limit of at least ${need} (have ${have}): raise it (\`ulimit -n ${need}\`) or lower BENCH_WS_CONNECTIONS`)
    }
  }
  if (subjects.length + wsSubjects.length + memTargets.length === 0 && !S.redisDown.enabled) throw new UsageError('nothing to run')

  const wsRound = S.ws.warmup + S.ws.duration + 1
  const planned = subjects.length * (S.prime + S.rounds * (S.warmup + S.duration)) +
    (S.rate.rps !== 0 ? subjects.length * S.rate.rounds * (S.rate.warmup + S.rate.duration + 1) : 0) +
    (S.redisDown.enabled ? (S.redisDown.warmup ?? (subjects.some((s) => s.name === 'gateway-redis') ? 3 : 10)) + 3 * S.redisDown.duration + 10 : 0) +
    wsSubjects.length * (S.ws.prime + S.rounds * wsRound) +
    memTargets.length * (2 * S.ws.settle + 5 + S.ws.connections * 0.004)
  const started = Date.now()

  const tmp = mkdtempSync(path.join(os.tmpdir(), 'resonance-bench-'))
  process.on('exit', () => rmSync(tmp, { recursive: true, force: true }))
  installCleanup(() => current?.stop())
  // Runaway guard: the run is bounded even if something hangs.
  const budget = Math.round(planned * 1.3 + 120)
  setTimeout(() => { throw new Error(`bench exceeded its time budget (${budget} s)`) }, budget * 1000).unref()

  const nproc = os.availableParallelism() // before pinning narrows it to one CPU
  const pin = setupPinning()
  const pinText = pin.applied
    ? `applied: load generator (this process, pid ${process.pid}) on CPU ${pin.loadgenCpu}; app, issuer, private redis-servers and every subject on CPU ${pin.subjectCpu}`
    : `NOT applied (${pin.reason}): load generator and subjects share the CPUs, numbers are noisier`
  console.log(`pinning: ${pinText}`)
  console.log(`plan: HTTP ${subjects.map((s) => s.name).join(', ') || '(none)'}; ${S.rounds} rounds × (${S.warmup} s warm-up + ${S.duration} s measured), ` +
    `${S.prime} s priming per subject, ${S.connections} connections, ${S.tokens} tokens`)
  console.log(`plan: fixed rate ${S.rate.rps !== 0 && subjects.length ? `${S.rate.rps} req/s open loop, ${S.rate.rounds} rounds × ${S.rate.duration} s per HTTP subject` : 'skipped'}`)
  console.log(`plan: Redis down ${S.redisDown.enabled ? `up / hung / dead, ${S.redisDown.duration} s each` : 'skipped'}; ` +
    `WebSocket echo ${wsSubjects.map((s) => s.name).join(', ') || 'skipped'}${wsSubjects.length ? ` (${S.ws.echoConnections} connections, ${S.ws.warmup} s + ${S.ws.duration} s per round)` : ''}; ` +
    `WebSocket memory ${memTargets.map((s) => s.name).join(', ') || 'skipped'}${memTargets.length ? ` (${S.ws.connections} connections)` : ''}; about ${Math.round(planned)} s`)

  // The children get none of the gateway's settings from the caller's shell:
  // a stray REDIS_URL or JWKS_URL would silently change what is measured.
  const { LEAVES } = await import(pathToFileURL(path.join(SNAPSHOT, 'config/settings.js')).href)
  const cleanEnv = { ...process.env }
  for (const leaf of Object.values(LEAVES)) delete cleanEnv[leaf.env]
  delete cleanEnv.CONFIG_FILE
  delete cleanEnv.NODE_OPTIONS
  const emptyConfig = path.join(tmp, 'empty.yaml')
  writeFileSync(emptyConfig, '# intentionally empty: every setting comes from the environment\n')
  const exemptConfig = path.join(tmp, 'exempt.yaml')
  writeFileSync(exemptConfig, `# gateway-nolimit: every bench token carries this realm role\nrateLimit:\n  exempt:\n    roles: [${EXEMPT_ROLE}]\n`)

  const key = await makeKey()
  const issuerChild = spawnNode('issuer', path.join(BENCH_DIR, 'subjects/issuer.mjs'), {
    cwd: ROOT, pin, env: { ...cleanEnv, BENCH_REALM: REALM, BENCH_JWKS: JSON.stringify({ keys: [key.jwk] }) }
  })
  const appChild = spawnNode('app', APP_SCRIPT, { cwd: ROOT, pin, env: cleanEnv })
  const [issuerHello, appHello] = await Promise.all([waitHello(issuerChild), waitHello(appChild)])
  const redisDir = path.join(tmp, 'redis')
  mkdirSync(redisDir)
  const ctx = {
    pin,
    cleanEnv,
    tmp,
    publicKeyPem: key.publicKeyPem,
    emptyConfig,
    exemptConfig,
    httpRuns: new Map(),
    issuer: { issuer: issuerHello.issuer, url: `http://127.0.0.1:${issuerHello.port}`, pid: issuerChild.pid },
    app: { url: `http://127.0.0.1:${appHello.port}`, pid: appChild.pid, child: appChild },
    startRedis: (name, port) => startRedis(name, { pin, env: cleanEnv, dir: redisDir, port })
  }

  const t0 = Date.now()
  const tokens = await signTokens(key, ctx.issuer.issuer, S.tokens)
  // The WebSocket memory warm-up's own users (see wsMemPhase).
  const warmTokens = memTargets.length && S.ws.memWarmup > 0 ? await signTokens(key, ctx.issuer.issuer, Math.min(S.ws.memWarmup, 200)) : []
  console.log(`signed ${tokens.length + warmTokens.length} RS256 tokens (distinct subs) in ${Date.now() - t0} ms; issuer ${ctx.issuer.issuer}`)

  const watch = makeWatch()
  watch.add(issuerChild)
  watch.add(appChild)

  const http = subjects.length ? await httpPhase(ctx, subjects, tokens, watch) : undefined
  // Before the Redis-down phase: that one kills gateway-redis's Redis.
  if (S.rate.rps === 'auto') {
    const slowest = Math.min(...(http?.rows ?? []).map((r) => r.rps).filter((x) => Number.isFinite(x)))
    S.rate.rps = Number.isFinite(slowest) ? Math.max(50, Math.min(1000, Math.floor(0.4 * slowest / 50) * 50)) : 0
    if (S.rate.rps > 0) console.log(`fixed rate: ${S.rate.rps} req/s (40% of the slowest subject's ${fmt.int(slowest)} req/s, at most 1000; BENCH_RATE overrides)`)
  }
  const fixed = subjects.length && S.rate.rps > 0 ? await ratePhase(ctx, subjects, tokens, watch) : undefined
  const down = S.redisDown.enabled ? await redisDownPhase(ctx, tokens, watch) : undefined
  const wsEcho = wsSubjects.length ? await wsEchoPhase(ctx, wsSubjects, tokens, watch) : undefined
  const wsMem = memTargets.length ? await wsMemPhase(ctx, memTargets, tokens, warmTokens, watch) : undefined

  let issuerStats = 'n/a'
  try { issuerStats = JSON.stringify(await (await fetch(`${ctx.issuer.url}/stats`)).json()) } catch {}
  const elapsed = (Date.now() - started) / 1000

  // ---- warnings
  const warnings = []
  const notes = []
  let failed = false
  if (http) {
    for (const r of http.rows) {
      if (r.bad > 0) { failed = true; warnings.push(`${r.name}: ${r.bad} non-2xx responses / socket errors / timeouts in measured rounds: THESE NUMBERS ARE INVALID (see the per-round status codes)`) }
      if (r.warmupBad > 0) warnings.push(`${r.name}: ${r.warmupBad} non-2xx responses / errors during warm-up`)
      if (r.loadgen !== undefined && r.loadgen > 90) warnings.push(`${r.name}: the load generator used ${fmt.pct(r.loadgen)} of its CPU: its req/s may be limited by autocannon, not by the subject (CPU µs/req is still valid)`)
    }
    if (subjects.every((s) => s.name !== BASELINE)) warnings.push(`the baseline (${BASELINE}) was not run: no HTTP ratios`)
  }
  for (const r of fixed ?? []) {
    if (r.bad > 0) { failed = true; warnings.push(`fixed rate ${r.name}: ${r.bad} non-2xx responses / errors: THESE NUMBERS ARE INVALID`) }
    if (r.late > 50) warnings.push(`fixed rate ${r.name}: the sender fell ${fmt.ms(r.late)} ms behind its schedule at least once (load generator busy): latencies include it`)
  }
  if (down) {
    for (const m of down.phases) {
      const bad = m.non2xx + m.errors + m.timeouts
      if (bad > 0) {
        failed = true
        warnings.push(`Redis down, ${m.label}: ${m.non2xx} non-2xx and ${m.errors + m.timeouts} errors/timeouts with RATE_LIMIT_ON_STORE_ERROR=open (status codes ${JSON.stringify(m.statusCodes)}): every answer should have been 200`)
      }
    }
  }
  if (wsEcho) {
    for (const r of wsEcho.rows) {
      if (r.bad > 0) { failed = true; warnings.push(`WebSocket echo ${r.name}: ${r.bad} connection errors or mismatched echoes (see the per-round lines)`) }
      if (r.loadgen !== undefined && r.loadgen > 90) warnings.push(`WebSocket echo ${r.name}: the load generator used ${fmt.pct(r.loadgen)} of its CPU: round trips/s may be limited by the client, not by the subject`)
      else if (r.loadgen !== undefined && r.loadgen > 75) notes.push(`WebSocket echo ${r.name}: the load generator used a median ${fmt.pct(r.loadgen)} of its core, close to its limit: ${r.name}'s round trips/s is rather a lower bound (CPU per round trip is unaffected)`)
    }
  }
  if (wsMem) {
    for (const r of wsMem) {
      const bad = [...r.failures.values(), ...r.closedEarly.values()].reduce((a, b) => a + b, 0)
      if (bad > 0) { failed = true; warnings.push(`WebSocket memory ${r.name}: ${r.failures.size ? `failed to open: ${fmtReasons(r.failures)}` : ''}${r.closedEarly.size ? ` closed early: ${fmtReasons(r.closedEarly)}` : ''}`) }
      if (r.gauge !== undefined && r.gauge !== r.stillOpen) warnings.push(`WebSocket memory ${r.name}: the gateway's resonance_ws_connections gauge said ${r.gauge} while ${r.stillOpen} client connections were open`)
      if (r.gaugeAfterClose !== undefined && r.gaugeAfterClose !== 0) warnings.push(`WebSocket memory ${r.name}: resonance_ws_connections still ${r.gaugeAfterClose} one second after every client closed (sessions not released?)`)
      if (r.after.gc === false || r.before.gc === false) notes.push(`WebSocket memory ${r.name}: no GC before a reading (${r.after.probe ?? 'probe without --expose-gc'}); RSS is without a forced GC`)
    }
  }
  const allMeasurements = [...(http?.results ?? []), ...(wsEcho?.results ?? [])]
  const noisy = median(allMeasurements.map((m) => m.noise.subjectCore ?? m.noise.machine))
  if (noisy !== undefined && noisy > 10) {
    warnings.push(`other processes used a median ${fmt.pct(noisy)} of ${pin.applied ? 'the subject core' : 'a core'} during the measurements (the machine was shared): ` +
      'req/s and latencies are pessimistic and noisy; CPU µs/req holds up better')
  }
  if (!pin.applied) warnings.push(`CPU pinning not applied (${pin.reason})`)
  const logLines = []
  for (const [name, run] of [['issuer', { child: issuerChild }], ['app', { child: appChild }], ...(http ? [...ctx.httpRuns] : []), ...(wsEcho ? [...wsEcho.runs].map(([n, r]) => [`ws ${n}`, r]) : [])]) {
    if (run.child?.lines.length) logLines.push(`- ${name}: ${run.child.lines.length} stdout lines during the run: ${logSummary(run.child).slice(0, 400)}`)
  }
  for (const r of wsMem ?? []) if (r.logs) logLines.push(`- ws memory ${r.name}: ${r.logs.slice(0, 400)}`)
  if (logLines.length) notes.push('subjects logged during the run (at LOG_LEVEL=warn a healthy gateway is silent):\n' + logLines.join('\n'))

  // ---- console
  const sections = []
  if (http) {
    sections.push(`## HTTP: one request through each subject\n\n${httpTable(http.rows)}\n\n` +
      `Medians of ${S.rounds} interleaved rounds; ${S.duration} s measured per round after ${S.warmup} s warm-up; ${S.connections} connections (closed loop). ` +
      'Ratios: per round against the plain proxy (and HAProxy) of the same round, then the median; "vs HAProxy" columns are "higher is better" for req/s and p99 (HAProxy p99 / row p99), "lower is better" for CPU/req.\n' +
      httpNotes(http.rows).map((n) => `\n- ${n}`).join(''))
  }
  if (fixed) {
    sections.push(`## Fixed rate: the latency each subject adds at ${fmt.int(S.rate.rps)} req/s (open loop)\n\n${rateTable(fixed)}\n\n` +
      `Open loop (bench/lib/open-loop.mjs): one request every ${fmt.n2(1000 / S.rate.rps)} ms whatever the answers, up to 256 connections, latency measured from the moment each request was due ` +
      `(a stall shows in every request scheduled during it). ${S.rate.duration} s per subject and round after ${S.rate.warmup} s at the same rate (discarded), ${S.rate.rounds} interleaved rounds, subjects already warm from the HTTP table; ` +
      'percentiles over all rounds\' requests together. "added" = the row\'s percentile minus direct\'s: what the proxy adds, with the scheduler\'s ~1 ms tick and the app cancelled out. ' +
      'CPU µs/req here is at a light load (the core mostly idle), so it is higher than under saturation (fewer requests share each wake-up). ' +
      '"other load": busy time on the subject core from anything but the subject, the app and its Redis (other users of the machine), in % of the core, worst round: a tail in a round with high other load is the machine\'s, not the subject\'s.')
  }
  if (down) {
    sections.push(`## Redis down: gateway-redis while its Redis is up, hung, dead\n\n${redisDownTable(down.phases)}\n\n` +
      `${down.reused ? 'The gateway-redis process of the HTTP table (already warm), after another' : 'A fresh gateway with REDIS_URL to its own private redis-server, after'} ${down.warmup} s of load; ` +
      `RATE_LIMIT_ON_STORE_ERROR=open. ${S.connections} connections closed loop, ${S.redisDown.duration} s per row, back to back, ` +
      'each row starting right after the SIGSTOP / SIGKILL of redis-server (no settling). "store errors": increase of resonance_rate_limit_store_errors_total during the row. ' +
      `"longest gap": the longest time without any response (every connection stuck). "other load": as in the per-round tables (subject core / load-generator core).\n\n- ${down.recovery}\n- gateway log lines: ${down.logs || 'none'}`)
  }
  if (wsEcho) {
    sections.push(`## WebSocket echo: round trips through each path\n\n${wsEchoTable(wsEcho.rows)}\n\n` +
      `Medians of ${S.rounds} interleaved rounds; ${S.ws.echoConnections} connections, each sending a ${S.ws.messageBytes}-byte text message and waiting for its echo before the next (closed loop); ` +
      `${S.ws.duration} s measured per round after ${S.ws.warmup} s warm-up. Ratios: per round against direct (or the plain proxy), then the median; issue target for the gateway: ≥ 0.5× direct. ` +
      '"round trips per CPU-second vs direct" = (app CPU/round trip direct) / (proxy + app CPU/round trip through the path): the round-trips/s ratio the paths would show with the subject core to themselves; ' +
      'unlike round trips/s it does not depend on how much of the core other users took during each round.')
  }
  if (wsMem) {
    sections.push(`## WebSocket memory: idle connections held open\n\n${wsMemTable(wsMem)}\n\n` +
      `Fresh processes per target. Warm-up: ${S.ws.memWarmup} connections opened and closed (users of their own), then ${S.ws.settle} s settle, a forced GC (--expose-gc, bench/lib/mem-probe.mjs) and the "before" reading (VmRSS); ` +
      `then ${S.ws.connections} connections opened ${S.ws.batch} at a time (each with one echo, then idle; through the gateway ${Math.min(S.ws.connections, S.tokens)} users, ` +
      `${Math.ceil(S.ws.connections / S.tokens)} connections each, so the figure includes their per-user state), ${S.ws.settle} s settle, GC, "with connections" reading. ` +
      'KiB/connection = RSS difference / connections (issue target for the gateway: ≤ 20 KiB). The JS heap column (heapUsed after GC) is the steadier figure; RSS also counts native memory (sockets, buffers) and heap pages V8 keeps after a GC. ' +
      '"JS heap still held after closing": heapUsed after every client closed (GC; read each second from 1 s on until it stops shrinking, at most 6 s) minus "before", per connection: state that outlives the connections ' +
      '(per-user caches and counters by design; a figure close to the open one would be a leak).' +
      wsMem.filter((r) => r.upstreamKibPerConn !== undefined).map((r) => `\n\n- ${r.name}: the app behind it grew by ${fmt.kib(r.upstreamKibPerConn)} KiB per connection (its side of the upstream connections); ` +
        `${r.perSub ? `${r.perSub} connections per sub; ` : ''}gateway gauge resonance_ws_connections ${r.gauge ?? 'n/a'} while open, ${r.gaugeAfterClose ?? 'n/a'} one second after closing; ` +
        `"after closing" read ${r.closeSeconds.toFixed(1)} s after the clients started closing.`).join(''))
  }
  const console_ = sections.join('\n\n')
  console.log(`\n${console_}\n`)
  console.log(`run time ${elapsed.toFixed(0)} s`)
  for (const w of warnings) console.log(banner(w))
  for (const n of notes) console.log(`note: ${n}`)

  // ---- results file
  const cpus = os.cpus()
  const titles = (list, label) => (list.length ? `- ${label}: ${list.map((r) => `**${r.name}**: ${r.title}`).join('; ')}\n` : '')
  const httpDetails = http
    ? http.results.map((m) => `| ${m.round} | ${m.subject} | ${fmt.int(m.rps)} | ${fmt.int(m.total)} | ${fmt.ms(m.p50)} | ${fmt.ms(m.p99)} | ${fmt.us(m.cpuUsPerReq)} | ${fmt.pct(m.cpuPct)} | ${fmt.mib(m.rssKiB)} | ` +
      `${m.others.map((o) => `${o.label} ${fmt.us(o.usPerReq)}`).join(', ') || '–'} | ${fmt.pct(m.loadgenCpuPct)} | ${fmtNoise(m.noise)} | ${Object.entries(m.statusCodes).map(([k, v]) => `${k}: ${v}`).join(', ')}${m.errors || m.timeouts ? `; errors ${m.errors}, timeouts ${m.timeouts}` : ''} |`)
    : []
  const wsDetails = wsEcho
    ? wsEcho.results.map((m) => `| ${m.round} | ${m.subject} | ${fmt.int(m.rtps)} | ${fmt.int(m.total)} | ${fmt.ms(m.p50)} | ${fmt.ms(m.p99)} | ${fmt.us(m.cpuUsPerRt)} | ${fmt.pct(m.cpuPct)} | ` +
      `${m.others.map((o) => `${o.label} ${fmt.us(o.usPerReq)}`).join(', ') || '–'} | ${fmt.pct(m.loadgenCpuPct)} | ${fmtNoise(m.noise)} | ${m.errors.size ? fmtReasons(m.errors) : '0'} |`)
    : []
  const md = `# Gateway benchmark: latest run

${console_}
${warnings.length ? '\n' + warnings.map((w) => `> **Warning:** ${w.replace(/\n/g, '\n> ')}`).join('\n>\n') + '\n' : ''}${notes.length ? '\n' + notes.map((n) => `Note: ${n}`).join('\n\n') + '\n' : ''}
## Subjects

${titles(http?.rows ?? [], 'HTTP')}${titles(wsEcho?.rows ?? [], 'WebSocket echo')}${titles(wsMem ?? [], 'WebSocket memory')}
## Machine and settings

- date: ${new Date().toISOString()}
- CPU: ${cpus[0]?.model ?? 'unknown'}; nproc ${nproc}; load average at the end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}
- OS: ${os.type()} ${os.release()}; node ${process.version}${redisVersion ? `; ${redisVersion.replace(/ sha=.*$/, '')}` : ''}
- pinning: ${pinText}
- gateway: dist/ built from ${build.git}, dist/server.js from ${build.at}; every gateway of the run started from a copy of it taken at the start
- packages: fastify ${version('fastify')}, @fastify/http-proxy ${version('@fastify/http-proxy')}, @fastify/jwt ${version('@fastify/jwt')}, @fastify/rate-limit ${version('@fastify/rate-limit')}, ioredis ${version('ioredis')}, ws ${version('ws')}, autocannon ${version('autocannon')}
- HTTP load: autocannon, ${S.connections} connections, pipelining 1, GET ${REQUEST_PATH}<n> with ${S.tokens} distinct RS256 tokens (distinct subs) dealt out to the connections, ${Math.ceil(S.tokens / S.connections)} per connection${http ? `; app answer ${http.bodyBytes} bytes of JSON` : ''}
- HTTP per round and subject: ${S.warmup} s warm-up, ${S.duration} s measured; ${S.prime} s priming per subject before round 1
- WebSocket: ws ${version('ws')} clients in the runner, permessage-deflate off, path ${WS_PATH}; gateway token in \`?access_token=\`, each echo connection its own sub
- issuer fetches during the whole run: ${issuerStats}
- run time: ${elapsed.toFixed(0)} s
${http
  ? `
## Per round: HTTP

CPU µs/req: utime+stime of the process (all threads) during the measured ${S.duration} s / responses. "CPU" = that process's share of one core; "others" = the app process behind a proxy (and redis-server for Redis rows); "other load" = busy time from /proc/stat (incl. steal) minus the bench's own processes, in % of one core${pin.applied ? ', on the subject core / the load-generator core' : ', whole machine'}: the noise from whatever else ran on the machine.

| round | subject | req/s | responses | p50 ms | p99 ms | CPU µs/req | CPU | RSS MiB after | others µs/req | load generator CPU | other load | status codes |
|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|
${httpDetails.join('\n')}
`
  : ''}${wsEcho
  ? `
## Per round: WebSocket echo

CPU µs/rt: utime+stime of the subject process (for direct: the app) per round trip during the measured ${S.ws.duration} s.

| round | path | round trips/s | round trips | p50 ms | p99 ms | CPU µs/rt | CPU | others µs/rt | load generator CPU | other load | errors |
|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|
${wsDetails.join('\n')}
`
  : ''}`
  mkdirSync(path.dirname(RESULTS_FILE), { recursive: true })
  writeFileSync(RESULTS_FILE, md)
  console.log(`wrote ${path.relative(process.cwd(), RESULTS_FILE)}`)

  await stopAll()
  if (failed) process.exitCode = 1
}

main().catch((err) => {
  if (err instanceof UsageError) process.stderr.write(`bench: ${err.message}\n`)
  else process.stderr.write(banner(`bench failed: ${err.stack ?? err.message}`))
  process.exit(1) // the exit handler kills every child
})
