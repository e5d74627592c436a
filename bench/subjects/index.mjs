// The rows of each table of `npm run bench` and how each one is started. The
// other files in this folder are the processes themselves.
import { mkdtempSync, writeFileSync } from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'
import { freePorts, spawnNode, spawnProcess, waitHello, waitHttpOk } from '../lib/children.mjs'
import { APP_SCRIPT, AUDIENCE, BENCH_DIR, GATEWAY_ENTRY, ROOT, gatewayEnv, profileArgv as profileArgvIn } from '../lib/setup.mjs'
import { BASELINE, EXEMPT_ROLE, S, WS_GATEWAY_ENV } from '../settings.mjs'
import { HAPROXY_HEALTH, haproxyConfig } from './haproxy.mjs'

const PLAIN_PROXY_SCRIPT = path.join(BENCH_DIR, 'subjects/plain-proxy.mjs')
const TCP_PIPE_SCRIPT = path.join(BENCH_DIR, 'subjects/tcp-pipe.mjs')
const MEM_PROBE = path.join(BENCH_DIR, 'lib/mem-probe.mjs')

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
// Gateway variants differ only in env (see gatewayEnv in lib/setup.mjs for the shared part).
/** The `gateway` row's env on top of gatewayEnv(): nothing (in-process limit store, defaults). The cold-start variants start from it too. */
const GATEWAY_ENV = {}

export const SUBJECTS = [
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
    start: (ctx) => startGateway(ctx, 'gateway', GATEWAY_ENV)
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

// Cold-start variants (BENCH_COLD_START_VARIANTS): the `gateway` row above (same env, same app, same pinning),
// started fresh for every run. A variant differs only in `nodeFlags` (node options before the script, e.g.
// V8 flags), `env` (added to the gateway row's) and `node` ('image': the Node of the Dockerfile's NODE_IMAGE,
// bench/lib/node-image.mjs; otherwise the Node running the bench), all optional; add a variant as one line, e.g.
//   { name: 'warmup-5s', env: { WARMUP: '5s' }, default: false },
// The title (Node, flags and env) is derived from them.
export const COLD_START_VARIANTS = [
  { name: 'default', default: true },
  { name: 'image-node', node: 'image', default: true },
  { name: 'warmup', env: { WARMUP: '2s' }, default: false },
  { name: 'image-node-warmup', node: 'image', env: { WARMUP: '2s' }, default: false },
  { name: 'image-node-sparkplug', node: 'image', nodeFlags: ['--always-sparkplug'], default: false },
  { name: 'image-node-tier-early', node: 'image', nodeFlags: ['--invocation-count-for-maglev=100', '--invocation-count-for-turbofan=1000'], default: false },
  { name: 'image-node-min-semi-16', node: 'image', nodeFlags: ['--min-semi-space-size=16'], default: false },
  { name: 'semi-space-64', nodeFlags: ['--max-semi-space-size=64'], default: true },
  { name: 'semi-space-32', nodeFlags: ['--max-semi-space-size=32'], default: false }
].map((v) => ({ nodeFlags: [], env: {}, node: 'bench', ...v })).map((v) => ({ ...v, title: coldStartTitle(v) }))

function coldStartTitle ({ nodeFlags, env, node }) {
  const envText = Object.entries(env).map(([k, v]) => `${k}=${v}`).join(' ')
  const runtime = node === 'image' ? ' on the Node of the Dockerfile\'s NODE_IMAGE' : ''
  return `\`${envText ? envText + ' ' : ''}node ${nodeFlags.length ? nodeFlags.join(' ') + ' ' : ''}dist/server.js\`${runtime}, settings of the \`gateway\` row`
}

/** A fresh gateway of a cold-start variant, started as the `gateway` row is, plus the variant's node flags and env. */
export function startColdStartGateway (ctx, variant, name) {
  return startGateway(ctx, name, { ...GATEWAY_ENV, ...variant.env }, { execArgv: variant.nodeFlags, node: variant.execPath })
}

// WebSocket echo rows (BENCH_WS_SUBJECTS). `start` returns { url (http base), pid, child?, others }.
export const WS_SUBJECTS = [
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
    name: 'tcp-pipe',
    title: 'a bare Node.js TCP relay (net sockets piped both ways, handshake included; no parsing, auth or limits): the floor of any Node relay',
    auth: false,
    default: true,
    start: (ctx) => startScript(ctx, 'tcp-pipe', TCP_PIPE_SCRIPT, { UPSTREAM_URL: ctx.app.url })
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
    default: true,
    start: (ctx) => startGatewayWithRedis(ctx, 'gateway-ws-redis', 'redis-ws', WS_GATEWAY_ENV)
  }
]

// WebSocket memory targets (BENCH_WS_MEM_SUBJECTS): always fresh processes,
// started with --expose-gc and the memory probe, stopped after their run.
export const MEM_TARGETS = [
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
    title: 'a fresh gateway (settings as the WS echo gateway, no per-address cap on unauthenticated connections) in front of a fresh app',
    auth: true,
    default: true,
    start: async (ctx) => {
      const app = await startApp(ctx, 'app-wsmem-upstream', { execArgv: memArgv() })
      // The load generator is one address with BENCH_WS_BATCH handshakes in flight: the per-address cap on
      // connections not yet authenticated (64 by default) would reset the rest, and the row would measure fewer
      // connections than it says. The cap is not what this row measures.
      const env = { ...WS_GATEWAY_ENV, MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: '0' }
      const gw = await startGateway(ctx, 'gateway-wsmem', env, { upstream: app.url, execArgv: memArgv() })
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

/** --cpu-prof arguments when BENCH_PROFILE names a folder (the profile is written when the process exits). */
function profileArgv (name) { return profileArgvIn(S.profileDir, name) }

async function startGateway (ctx, name, extraEnv, { upstream = ctx.app.url, execArgv = [], node } = {}) {
  execArgv = [...execArgv, ...profileArgv(name)]
  const [port, adminPort] = await freePorts(2)
  const child = spawnNode(name, GATEWAY_ENTRY, { cwd: ROOT, execArgv, node, env: { ...gatewayEnv(ctx, { port, adminPort }, upstream), ...extraEnv }, pin: ctx.pin })
  const adminUrl = `http://127.0.0.1:${adminPort}`
  // /readyz is 200 once the JWKS is loaded (and, with REDIS_URL, Redis answers PING).
  await waitHttpOk(child, `${adminUrl}/readyz`)
  return { url: `http://127.0.0.1:${port}`, pid: child.pid, child, adminUrl, others: [{ label: 'app', pid: ctx.app.pid }] }
}

export async function startGatewayWithRedis (ctx, name, redisName, extraEnv) {
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
