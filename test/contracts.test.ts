// Contract tests: where src/ imitates a library's interface, or relies on a part of a library that is not its
// documented API, the imitation is compared with the real thing (same inputs, same options, output compared
// line for line), so a library upgrade that changes the behaviour fails here and not in production:
//   (a) StatusHistogram + the request counter (observability/metrics.ts) vs prom-client's own Histogram and Counter:
//       what Prometheus scrapes is identical (series, labels, buckets, sums, counts);
//   (b) LazyRequestLogger (observability/logger.ts), Fastify's request.log, vs the pino child Fastify would have made:
//       every level method and argument form, bindings, child(), redaction and serializers, the level read and set at
//       runtime (on the request logger and on its parent), route options (logLevel, logSerializers) - called directly
//       and through Fastify itself;
//   (c) LocalCounter (limits/local-counter.ts), the in-process limits, vs @fastify/rate-limit's LocalStore whose
//       semantics it keeps (the plugin does not export its store, so the gateway has its own): fixed windows, LRU
//       bound, synchronous answers, and the same answers as LocalStore over a random sequence of calls.
import { createRequire } from 'node:module'
import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import { pino, type Logger } from 'pino'
import { Counter, Histogram, Registry } from 'prom-client'
import { createMetrics } from '../src/observability/metrics.js'
import { LazyRequestLogger, loggerOptions } from '../src/observability/logger.js'
import { LocalCounter } from '../src/limits/local-counter.js'
import type { LogLevel } from '../src/config/parsers.js'

// --- (a) StatusHistogram vs prom-client ----------------------------------------------------------------------------------

const BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
const CLASSES = ['1xx', '2xx', '3xx', '4xx', '5xx']

function series (text: string, prefix: string): string[] {
  return text.split('\n').filter((l) => l.startsWith(prefix)).sort()
}

t.test('(a) request metrics: identical to prom-client\'s own Counter and Histogram', async (t) => {
  const m = createMetrics()
  const ref = new Registry()
  const refCount = new Counter({ name: 'resonance_http_requests_total', help: 'x', labelNames: ['status_class'], registers: [ref] })
  const refHist = new Histogram({ name: 'resonance_http_request_duration_seconds', help: 'x', labelNames: ['status_class'], buckets: BUCKETS, registers: [ref] })
  for (const c of CLASSES) { refCount.labels(c).inc(0); refHist.zero({ status_class: c }) }

  // Values on and around every bucket bound, very large and zero, every status class, odd statuses.
  const values = [0, 1e-6, ...BUCKETS.flatMap((b) => [b * 0.999, b, b * 1.001]), 42, 1e6]
  const statuses = [101, 200, 204, 302, 401, 404, 429, 500, 502, 504, 99, 600]
  let i = 0
  const check = async (what: string): Promise<void> => {
    const ours = await m.registry.metrics()
    const theirs = await ref.metrics()
    t.same(series(ours, 'resonance_http_request_duration_seconds'), series(theirs, 'resonance_http_request_duration_seconds'), `${what}: histogram series identical`)
    t.same(series(ours, 'resonance_http_requests_total'), series(theirs, 'resonance_http_requests_total'), `${what}: counter series identical`)
  }
  await check('nothing observed')
  for (const s of statuses) {
    for (const v of values) {
      m.observeRequest(s, v)
      const c = Math.floor(s / 100)
      const cls = c >= 1 && c <= 5 ? `${c}xx` : '5xx'
      refCount.labels(cls).inc()
      refHist.labels(cls).observe(v)
      i++
    }
    await check(`after ${i} observations`) // scraping in between must not lose or double anything
  }
  await check('scraped twice in a row')
})

// --- (b) LazyRequestLogger vs a pino child -------------------------------------------------------------------------------

/** What both loggers offer: the pino surface Fastify and src/ use on request.log. */
interface RequestLog {
  level: string
  fatal (...a: unknown[]): void
  error (...a: unknown[]): void
  warn (...a: unknown[]): void
  info (...a: unknown[]): void
  debug (...a: unknown[]): void
  trace (...a: unknown[]): void
  silent (...a: unknown[]): void
  child (bindings: Record<string, unknown>, opts?: Record<string, unknown>): RequestLog
}
const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const

/** The gateway's pino options (loggerOptions) writing into an array; only the timestamp is fixed, so lines compare. */
function capturedPino (level: LogLevel): { logger: Logger, lines: string[] } {
  const lines: string[] = []
  const logger = pino({ ...loggerOptions(level), timestamp: () => ',"time":0' }, { write (line: string) { lines.push(line) } })
  return { logger, lines }
}

type Script = (log: RequestLog, parent: Logger, seen: unknown[]) => void

/**
 * Runs `script` on a real pino child (what Fastify's default factory returns) and on a LazyRequestLogger (what the
 * gateway's factory returns) over parents with the same options; every line written and every value the script
 * observed must be the same.
 */
function sameAsPino (tt: Test, what: string, parentLevel: LogLevel, bindings: Record<string, unknown>, opts: Record<string, unknown>, script: Script): void {
  const real = capturedPino(parentLevel)
  const lazy = capturedPino(parentLevel)
  const seenReal: unknown[] = []
  const seenLazy: unknown[] = []
  script(real.logger.child(bindings, opts) as unknown as RequestLog, real.logger, seenReal)
  script(new LazyRequestLogger(lazy.logger as never, bindings, opts), lazy.logger, seenLazy)
  tt.ok(real.lines.length > 0 || parentLevel === 'silent', `${what}: pino wrote something to compare (${real.lines.length} lines)`)
  tt.same(lazy.lines, real.lines, `${what}: the same lines`)
  tt.same(seenLazy, seenReal, `${what}: the same levels seen`)
}

// Shared values: an Error's stack names the line that created it.
const ERR = Object.assign(new Error('boom'), { code: 'E_BOOM' })
const REQ = { method: 'GET', url: '/api/x?access_token=secret', ip: '10.0.0.1', headers: { authorization: 'Bearer secret' } }

/** Every level method with every argument form Fastify and src/ use (and a few they might). */
const everyForm: Script = (log) => {
  for (const l of LEVELS) {
    log[l]('message only')
    log[l]({ component: 'x', n: 1 }, 'object and message')
    log[l]({ component: 'x' })
    log[l]('format %s %d %o %j', 'str', 42, { o: 1 }, { j: 2 })
    log[l]('more arguments than placeholders', 'extra', 3)
    log[l](ERR)
    log[l](ERR, 'error and message')
    log[l]({ err: ERR }, 'err field')
    log[l]({ err: { message: ERR.message } }, 'err as src/ logs it')
    log[l]({ req: REQ, res: { statusCode: 502 } }, 'serialized req and res')
    log[l]({ authorization: 'Bearer a', token: 't', access_token: 'at', headers: { authorization: 'h', cookie: 'c', 'sec-websocket-protocol': 'p' } }, 'redacted')
    log[l]({ nested: { deep: [1, 'two', null] }, msg: 'msg field' })
    log[l](undefined, 'undefined object')
    log[l](null)
    log[l](42)
  }
  log.silent('never written')
}

t.test('(b) LazyRequestLogger writes what a pino child writes', async (t) => {
  const bindings = { reqId: 'req-1' }
  for (const level of ['trace', 'info', 'warn', 'silent'] as const) {
    sameAsPino(t, `every method and argument form, parent at ${level}`, level, bindings, {}, everyForm)
  }

  // The options Fastify passes: {} (inherit), a route's logLevel, a route's logSerializers.
  const routeOpts: Array<[string, Record<string, unknown>]> = [
    ['logLevel debug', { level: 'debug' }],
    ['logLevel error', { level: 'error' }],
    ['logSerializers', { serializers: { user: (u: { id: number }) => `user:${u.id}` } }],
    ['logLevel trace and logSerializers', { level: 'trace', serializers: { user: (u: { id: number }) => `user:${u.id}` } }]
  ]
  for (const [what, opts] of routeOpts) {
    sameAsPino(t, what, 'info', bindings, opts, (log, _parent, seen) => {
      seen.push(log.level)
      log.info({ user: { id: 7 } }, 'serialized user')
      everyForm(log, _parent, seen)
      seen.push(log.level)
    })
  }

  sameAsPino(t, 'level read and set on the request logger', 'info', bindings, {}, (log, _parent, seen) => {
    seen.push(log.level) // read before any line: the lazy logger has not made its child yet
    log.level = 'debug'
    seen.push(log.level)
    log.debug('debug after raising')
    log.level = 'error'
    seen.push(log.level)
    log.warn('warn after lowering')
    log.error('error after lowering')
    log.level = 'silent'
    log.fatal('silenced')
    seen.push(log.level)
  })

  sameAsPino(t, 'the parent\'s level changed at runtime before the first line (LOG_LEVEL reload)', 'info', bindings, {}, (log, parent, seen) => {
    parent.level = 'debug'
    seen.push(log.level)
    log.debug('debug after the parent was raised')
    parent.level = 'warn'
    seen.push(log.level)
    log.info('info after the parent was lowered')
    log.warn('warn after the parent was lowered')
  })

  sameAsPino(t, 'the parent\'s level changed at runtime after the first line', 'info', bindings, {}, (log, parent, seen) => {
    log.info('first')
    parent.level = 'trace'
    seen.push(log.level)
    log.trace('trace after the parent was raised')
    parent.level = 'error'
    seen.push(log.level)
    log.warn('warn after the parent was lowered')
  })

  sameAsPino(t, 'a route logLevel holds when the parent\'s level changes', 'info', bindings, { level: 'debug' }, (log, parent, seen) => {
    parent.level = 'error'
    seen.push(log.level)
    log.debug('route level still debug')
    parent.level = 'trace'
    seen.push(log.level)
    log.trace('trace is not in the route level')
  })

  sameAsPino(t, 'child(): bindings, nested children, child options', 'info', bindings, {}, (log, parent, seen) => {
    const c = log.child({ component: 'jwks' }) // before the request logger wrote anything
    c.info('from the child')
    log.info('from the request logger')
    const d = log.child({ component: 'verbose' }, { level: 'debug' })
    d.debug('a child with options')
    seen.push(d.level)
    const cc = c.child({ sub: 'u1', reqId: 'shadowed' }, { level: 'debug' })
    cc.debug({ extra: true }, 'grandchild at debug')
    seen.push(c.level, cc.level)
    c.level = 'warn'
    c.info('child lowered')
    log.info('request logger unaffected by its child')
    parent.level = 'debug'
    seen.push(log.level, c.level, cc.level)
    log.debug('request logger follows the parent')
    c.debug('the lowered child does not')
  })
})

// The same through Fastify: what the gateway's childLoggerFactory produces as request.log and reply.log, on every path
// Fastify logs itself (incoming request, request completed, a handler error, a 404), against Fastify's own child.
async function fastifyLines (lazy: boolean): Promise<{ lines: string[], lazyLoggers: boolean[] }> {
  const { logger, lines } = capturedPino('info')
  const lazyLoggers: boolean[] = [] // whether each request.log was a LazyRequestLogger
  const app = Fastify({
    loggerInstance: logger,
    ...(lazy ? { childLoggerFactory: (l, b, o) => new LazyRequestLogger(l as never, b, o as Record<string, unknown>) as never } : {})
  }) as unknown as FastifyInstance
  app.get('/plain', async (request) => {
    lazyLoggers.push(request.log instanceof LazyRequestLogger)
    request.log.info({ component: 'x' }, 'hello')
    request.log.debug('not at info')
    return 'ok'
  })
  app.get('/debug', { logLevel: 'debug' }, async (request) => { request.log.debug('route at debug'); return 'ok' })
  app.get('/serializers', { logSerializers: { user: (u: { id: number }) => `user:${u.id}` } }, async (request) => {
    request.log.info({ user: { id: 7 } }, 'serialized')
    return 'ok'
  })
  app.get('/child', async (request) => { request.log.child({ component: 'c' }).warn('from a child'); return 'ok' })
  app.get('/raise', async (request, reply) => {
    request.log.level = 'debug'
    reply.log.debug('raised for this request')
    return request.log.level
  })
  app.get('/quiet', async () => 'nothing logged by the handler')
  app.get('/boom', async () => { throw ERR })
  await app.ready()
  for (const url of ['/plain', '/debug', '/serializers', '/child', '/raise', '/plain', '/quiet', '/boom', '/missing?token=x']) {
    await app.inject({ url, headers: { authorization: 'Bearer secret' } })
  }
  app.log.level = 'debug' // a LOG_LEVEL reload
  await app.inject({ url: '/plain' })
  await app.close()
  // The only value that differs between two runs: how long a request took.
  return { lines: lines.map((l) => l.replace(/"responseTime":[0-9.e-]+/, '"responseTime":0')), lazyLoggers }
}

t.test('(b) through Fastify: request.log from the gateway\'s factory writes what Fastify\'s own child writes', async (t) => {
  const { lines: real, lazyLoggers: none } = await fastifyLines(false)
  const { lines: lazy, lazyLoggers: all } = await fastifyLines(true)
  t.same([none, all], [[false, false, false], [true, true, true]], 'request.log is Fastify\'s pino child, then a LazyRequestLogger')
  t.ok(real.length >= 20, `Fastify logged ${real.length} lines to compare`)
  t.ok(real.some((l) => l.includes('"msg":"route at debug"')) && real.some((l) => l.includes('"msg":"raised for this request"')), 'route and runtime levels took effect')
  t.ok(real.some((l) => l.includes('"reqId":"req-') && l.includes('"err":{')), 'the handler error was logged with its request id')
  t.same(lazy, real)
})

// --- (c) LocalCounter vs @fastify/rate-limit's LocalStore ---------------------------------------------------------------

interface Hits { current: number, ttl: number }
interface LimitCounter { incr (key: string, cb: (err: Error | null, res?: Hits) => void, windowMs: number, max: number): void }

/** The plugin's own in-process store (an Error when it cannot be loaded): what LocalCounter is compared with. */
function loadLocalStore (): unknown {
  try { return createRequire(import.meta.url)('@fastify/rate-limit/store/LocalStore') } catch (err) { return err }
}
const LocalStore = loadLocalStore()
/** LocalStore as the gateway used it before it had LocalCounter: continueExceeding and exponentialBackoff off. */
const newLocalStore = (entries: number): LimitCounter => new (LocalStore as new (c: boolean, e: boolean, n: number) => LimitCounter)(false, false, entries)
const newCounter = (entries: number): LimitCounter => new LocalCounter(entries)

/** One incr, answered synchronously (limits/ws.ts counts on it): a copy of what the callback got. */
function hit (store: LimitCounter, key: string, windowMs: number, max: number): Hits {
  let got: { err: Error | null, res?: Hits } | undefined
  store.incr(key, (err, res) => { got = { err, res: res === undefined ? undefined : { current: res.current, ttl: res.ttl } } }, windowMs, max)
  if (got === undefined) throw new Error('incr did not call back synchronously')
  if (got.err !== null || got.res === undefined) throw new Error(`incr failed: ${String(got.err)}`)
  return got.res
}

t.test('(c) LocalCounter: fixed windows, bounded entries, synchronous answers; the same answers as LocalStore', async (t) => {
  const realNow = Date.now
  let now = 1_000_000
  Date.now = () => now
  t.teardown(() => { Date.now = realNow })

  await t.test('fixed window: counts from 1, ttl is what is left of the window, no extension or backoff past max', async (tt) => {
    const store = newCounter(100)
    tt.same(hit(store, 'k', 1000, 2), { current: 1, ttl: 1000 }, 'first hit: 1, the whole window')
    now += 300
    tt.same(hit(store, 'k', 1000, 2), { current: 2, ttl: 700 })
    now += 300
    tt.same(hit(store, 'k', 1000, 2), { current: 3, ttl: 400 }, 'over max: still counted, the window is not extended')
    tt.same(hit(store, 'k', 1000, 2), { current: 4, ttl: 400 }, 'no exponential backoff')
    tt.same(hit(store, 'other', 1000, 2), { current: 1, ttl: 1000 }, 'keys count apart')
    now += 399
    tt.same(hit(store, 'k', 1000, 2), { current: 5, ttl: 1 }, 'the last millisecond of the window')
    now += 1
    tt.same(hit(store, 'k', 1000, 2), { current: 1, ttl: 1000 }, 'an elapsed window starts again from 1')
    tt.same(hit(store, 'k', 5000, 2), { current: 2, ttl: 5000 }, 'the window is the one passed to this call (a reload)')
  })

  await t.test('the third argument bounds the entries kept, least recently used evicted first', async (tt) => {
    const store = newCounter(2)
    hit(store, 'a', 60_000, 10)
    hit(store, 'b', 60_000, 10)
    hit(store, 'a', 60_000, 10) // a is now the most recently used
    hit(store, 'c', 60_000, 10) // evicts b
    tt.equal(hit(store, 'a', 60_000, 10).current, 3, 'a was kept')
    tt.equal(hit(store, 'b', 60_000, 10).current, 1, 'b was evicted: it counts from 1 again')
  })

  await t.test('the same answers as @fastify/rate-limit\'s LocalStore over 20,000 random calls', async (tt) => {
    if (typeof LocalStore !== 'function') {
      tt.fail(`@fastify/rate-limit/store/LocalStore could not be loaded: ${String(LocalStore)}`)
      return
    }
    let seed = 42
    const random = (n: number): number => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n }
    const ours = newCounter(8)
    const theirs = newLocalStore(8)
    const diffs: string[] = []
    for (let i = 0; i < 20_000 && diffs.length < 5; i++) {
      now += random(40)
      const key = `k${random(12)}`
      const windowMs = [100, 250, 1000][random(3)] as number
      const a = hit(ours, key, windowMs, 5)
      const b = hit(theirs, key, windowMs, 5)
      if (a.current !== b.current || a.ttl !== b.ttl) diffs.push(`call ${i} ${key} ${windowMs}: ours ${JSON.stringify(a)}, LocalStore ${JSON.stringify(b)}`)
    }
    tt.same(diffs, [], 'no call answered differently')
  })
})
