/**
 * Self warm-up (WARMUP, off by default): before /readyz reports 200, this
 * process drives synthetic traffic through a throwaway second gateway built
 * from the same code (buildGateway) and the same settings, so that V8 has
 * compiled and optimised the request path before an orchestrator sends real
 * traffic. V8 keeps bytecode, type feedback and optimised code per function
 * (closures from one creation site share them), so the module-level request
 * path the throwaway makes hot is hot for the real gateway too.
 *
 * Only partly, though, and at a price (measured, bench/README.md part 5):
 * each Fastify instance has its own Request and Reply classes and hook
 * closures, so the real gateway's first requests meet hidden classes and call
 * targets the optimised code did not see: ~60 functions of the pipeline
 * deoptimise at once ("wrong map", "wrong call target", --trace-deopt) and are
 * optimised again during the first 1-2 s of load. The curve still moves (9
 * runs each, WARMUP=2s against none: median fraction of steady req/s in s1
 * 0.23 vs 0.14, s2 0.54 vs 0.28, s3 0.82 vs 0.61, mean s1-5 0.61 vs 0.53;
 * ready after 3.5 s instead of 1.0 s), but the code stays polymorphic over
 * both instances: steady CPU per request ~5% higher for the life of the
 * process (6 processes each, interleaved; a forced GC after the warm-up, or
 * two throwaways, did not remove it). Those runs were on Node 20; on the
 * image's Node 24, whose Maglev tier already makes a cold process faster, it
 * gains less (3 runs against 8: s1 0.41 vs 0.22, mean s1-5 0.68 vs 0.59, 90%
 * of steady reached no earlier). Hence off by default; worth it where the
 * first two seconds matter more than that.
 *
 * Nothing of the real gateway is touched: the throwaway has its own loopback
 * issuer and app (stub.ts) with a key made now (tokens.ts), its own key store,
 * in-process limits (no Redis), its own metrics registry (without process
 * metrics) and a null log and audit destination, and no admin listener. A
 * failure or overrun is a warning; the gateway becomes ready either way.
 */
import { devNull } from 'node:os'
import type { FastifyBaseLogger } from 'fastify'
import pino from 'pino'
import { buildGateway, type Gateway } from '../app.js'
import { withLeaves, type Config } from '../config/load.js'
import type { CheckResult } from '../observability/health.js'
import { drive, emptyReport, type LoadReport } from './load.js'
import { LOOPBACK, startStub, type Stub } from './stub.js'
import { makeSigningKey, mintTokens, type TokenClaims } from './tokens.js'

/** The warm-up is cut off this long after its WARMUP duration (key generation, start, close). */
export const WARMUP_GRACE_MS = 10_000
/** Distinct users (tokens); each signature costs ~0.5 ms (RSA 2048). */
const TOKENS = 128
/**
 * Spellings of the Authorization scheme (RFC 9110: case-insensitive, and the
 * gateway accepts more than one space). The verified-token cache is keyed by
 * the whole header value, so each spelling of a token is verified once more:
 * four times the verify-path runs for the same signing cost.
 */
const SCHEMES = ['Bearer ', 'bearer ', 'BEARER ', 'Bearer  ']
const HTTP_CONNECTIONS = 16
const WS_CLIENTS = 2
/** Far above what the warm-up sends: the per-user budgets never answer 429 (WebSocket messages likewise). */
const UNLIMITED = Number.MAX_SAFE_INTEGER

export interface WarmupReport extends LoadReport {
  tokens: number
  ms: number
}

/**
 * The real configuration, pointed at the stub: loopback listener on an
 * ephemeral port, no Redis, no config watch, no warm-up of its own. TLS stays
 * as configured (the same listener kind); without TLS a token over plain
 * loopback must be accepted. Everything else (algorithms, audiences, rules,
 * timeouts, cache size, WebSocket settings) is the real gateway's.
 */
export function throwawayConfig (config: Config, stub: Pick<Stub, 'url' | 'issuer'>): Config {
  return withLeaves(config, {
    'server.host': LOOPBACK,
    'server.port': 0,
    'server.allowInsecureHttp': config.server.tls === undefined || config.server.allowInsecureHttp,
    'server.configWatch': false,
    'server.warmup': 0,
    'upstream.url': stub.url,
    'auth.issuer': stub.issuer,
    'auth.jwksUrl': undefined,
    'redis.url': undefined,
    'redis.clusterNodes': [],
    'rateLimit.max': UNLIMITED,
    'ws.messageLimit.max': UNLIMITED
  })
}

/** The claims of the warm-up's tokens: accepted by `config`, passing every role rule, held to the limits. */
function tokenClaims (config: Config): TokenClaims {
  const exempt = config.rateLimit.exempt.roles
  return {
    audience: config.auth.audiences[0] ?? 'warmup',
    roles: [...new Set(config.auth.routes.flatMap((r) => r.roles))].filter((r) => !exempt.includes(r)),
    client: config.auth.roleClients[0] ?? 'warmup',
    ttlSeconds: 600
  }
}

/**
 * Builds the throwaway against a fresh stub, drives `durationMs` of traffic
 * through it and closes both. Resolves with what was done; rejects when the
 * throwaway could not be set up. `signal` stops the traffic early. The key is
 * generated (in the thread pool) while the throwaway is built.
 */
export async function warmUp (config: Config, durationMs: number, signal: AbortSignal): Promise<WarmupReport> {
  const started = performance.now()
  const making = makeSigningKey(config.auth.algorithms)
  making.catch(() => {}) // awaited below; a failure before that is not an unhandled rejection
  const stub = await startStub()
  const sink = pino.destination({ dest: devNull, sync: true })
  try {
    const gw = await buildGateway(throwawayConfig(config, stub), { logStream: sink, auditStream: sink, env: {}, processMetrics: false })
    try {
      const key = await untilAborted(making, signal)
      stub.publish(key.jwks)
      const tokens = mintTokens(key, { ...tokenClaims(config), issuer: stub.issuer }, TOKENS)
      const url = await listen(gw)
      const report = emptyReport()
      await drive({
        url,
        credentials: SCHEMES.flatMap((scheme) => tokens.map((t) => scheme + t)),
        tokens,
        until: performance.now() + durationMs,
        httpConnections: httpConnections(config),
        wsClients: WS_CLIENTS,
        signal
      }, report)
      return { ...report, tokens: TOKENS, ms: Math.round(performance.now() - started) }
    } finally {
      await gw.close()
    }
  } finally {
    await stub.close()
    sink.destroy()
  }
}

/** Starts the throwaway (its JWKS from the stub) and listens on loopback; its URL. */
async function listen (gw: Gateway): Promise<string> {
  await gw.start()
  if (!gw.keys.ready) throw new Error(`the warm-up's key set did not load: ${gw.keys.error ?? 'unknown error'}`)
  await gw.app.listen({ host: LOOPBACK, port: 0 })
  const address = gw.app.server.address()
  if (address === null || typeof address === 'string') throw new Error('the warm-up listener has no port')
  return `${gw.config.server.tls !== undefined ? 'https' : 'http'}://${LOOPBACK}:${address.port}`
}

/** Connections in flight, within the cap on not-yet-authenticated connections per address (every one starts so). */
function httpConnections (config: Config): number {
  const cap = config.server.maxUnauthenticatedPerIp
  return cap > 0 ? Math.min(HTTP_CONNECTIONS, cap) : HTTP_CONNECTIONS
}

/**
 * Runs the warm-up of `gw` (WARMUP > 0): a `warmup` readiness check fails
 * until it has ended, then passes with what it did (or why it failed). Logs
 * one line: info with the figures, or a warning. Never rejects.
 */
export async function warmUpBeforeReady (gw: Gateway): Promise<void> {
  const durationMs = gw.config.server.warmupMs
  if (durationMs <= 0) return
  let state: CheckResult = { ok: false, detail: 'warming up' }
  gw.readiness.add('warmup', () => state)
  const log = gw.app.log.child({ component: 'warmup' })
  const stop = new AbortController()
  const started = performance.now()
  try {
    state = reported(await bounded(warmUp(gw.config, durationMs, stop.signal), durationMs + WARMUP_GRACE_MS, stop), log)
  } catch (err) {
    const message = (err as Error).message
    log.warn({ err: { message }, ms: Math.round(performance.now() - started) }, 'warm-up failed; ready without it')
    state = { ok: true, detail: `failed: ${message}` }
  }
}

/** Logs what the warm-up did (a warning when a request failed or none was answered); the check's final state. */
function reported (r: WarmupReport, log: FastifyBaseLogger): CheckResult {
  const summary = `${r.requests} requests, ${r.wsSessions} WebSocket sessions (${r.wsMessages} messages) in ${r.ms} ms`
  if (r.errors > 0 || r.requests === 0) {
    log.warn({ ...r }, `warm-up incomplete (${r.errors} errors: ${r.firstError ?? 'no request answered'}); ready anyway`)
    return { ok: true, detail: `incomplete: ${summary}, ${r.errors} errors` }
  }
  log.info({ ...r }, `warm-up done: ${summary}`)
  return { ok: true, detail: `done: ${summary}` }
}

/** `p`, or a rejection as soon as `signal` aborts (so that a hung step does not keep the throwaway open). */
async function untilAborted<T> (p: Promise<T>, signal: AbortSignal): Promise<T> {
  let onAbort: (() => void) | undefined
  const aborted = new Promise<never>((_resolve, reject) => {
    onAbort = () => { reject(new Error('aborted')) }
    if (signal.aborted) onAbort()
    else signal.addEventListener('abort', onAbort, { once: true })
  })
  try {
    return await Promise.race([p, aborted])
  } finally {
    if (onAbort !== undefined) signal.removeEventListener('abort', onAbort)
  }
}

/** `work`, or a rejection after `ms` (which also aborts it; its own cleanup goes on in the background). */
async function bounded<T> (work: Promise<T>, ms: number, stop: AbortController): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const overrun = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => {
      stop.abort()
      reject(new Error(`did not end within ${ms} ms`))
    }, ms)
  })
  work.catch(() => {}) // a late failure after the overrun is not an unhandled rejection
  try {
    return await Promise.race([work, overrun])
  } finally {
    clearTimeout(timer)
  }
}
