/**
 * buildGateway(config) assembles the gateway and never listens (server.ts
 * does). Registration order below IS the request pipeline:
 *
 *   config -> transport guard + auth (onRequest) -> limits (preHandler)
 *          -> proxy (HTTP: @fastify/http-proxy, WebSocket: bridge)
 *   audit + metrics beside every step; admin listener separate.
 */
import { randomBytes } from 'node:crypto'
import { readFileSync } from 'node:fs'
import type { IncomingMessage } from 'node:http'
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import pino, { type DestinationStream } from 'pino'
import type { Config } from './config/load.js'
import { configWarnings } from './config/load.js'
import { LiveConfig, type ReloadResult } from './config/live.js'
import { LazyRequestLogger, loggerOptions } from './observability/logger.js'
import { createMetrics, type Metrics } from './observability/metrics.js'
import { auditDestination, createAudit, type Audit } from './observability/audit.js'
import { KeyStore } from './auth/keys.js'
import authPlugin from './auth/plugin.js'
import { registerBackchannelLogout } from './auth/logout.js'
import { authAnswer, clientErrorAnswer, INTERNAL_ERROR, METHOD_NOT_ALLOWED, send, UNROUTABLE } from './http/answers.js'
import { isWebSocketHandshake, proxyTrust } from './auth/transport.js'
import { registerHttpProxy } from './proxy/http.js'
import { registerWsProxy, type WsBridge } from './proxy/ws.js'
import { buildAdmin } from './admin/plugin.js'
import { Readiness } from './admin/readiness.js'
import { connectRedis, createRedis } from './limits/redis.js'
import { LimitStore } from './limits/store.js'
import { AuthFailureLimiter } from './limits/auth-failures.js'
import { registerHttpLimits } from './limits/http.js'
import { ConnectionSlots, WsMessageLimiter } from './limits/ws.js'
import { guardConnections, listenerDeadlines, type ListenerDeadlines } from './limits/connections.js'
import { Revocations } from './auth/revocation.js'

export interface GatewayDeps {
  /** Where logs go (default stdout); tests capture them here. */
  logStream?: DestinationStream
  /** Where audit lines go (default: the AUDIT_LOG destination); tests capture them here. */
  auditStream?: DestinationStream
  /** The environment the config was loaded from; reloads read it again (default process.env). */
  env?: NodeJS.ProcessEnv
  /** prom-client's process_* and nodejs_* metrics (default true; observability/metrics.ts says why a throwaway gateway goes without). */
  processMetrics?: boolean
}

export interface Gateway {
  app: FastifyInstance
  admin: FastifyInstance
  config: Config
  keys: KeyStore
  metrics: Metrics
  audit: Audit
  readiness: Readiness
  ws: WsBridge
  revocations: Revocations
  live: LiveConfig
  /** Loads the JWKS (readiness waits for it; requests never block on it). */
  start (): Promise<void>
  /** Re-reads the YAML file and env (SIGHUP); the old config stays when the new one is invalid. */
  reload (): ReloadResult
  /** Graceful stop: readiness fails, WebSockets get 1001, in-flight requests finish. */
  close (): Promise<void>
}

const REQUEST_ID_RE = /^[A-Za-z0-9._:-]{1,128}$/

/**
 * New request ids: a random prefix per gateway (64 bits, so replicas and
 * gateways in one process never collide) and its own counter. As unique as a
 * UUID per request for tracing, at a fraction of its cost (randomUUID showed
 * up in the request profile). A caller-supplied X-Request-Id is kept when it
 * is sane.
 */
function requestIds (): (req: IncomingMessage) => string {
  const prefix = randomBytes(8).toString('hex')
  let counter = 0
  return (req) => {
    const h = req.headers['x-request-id']
    return typeof h === 'string' && REQUEST_ID_RE.test(h) ? h : `${prefix}-${(++counter).toString(36)}`
  }
}

export async function buildGateway (config: Config, deps: GatewayDeps = {}): Promise<Gateway> {
  const metrics = createMetrics({ processMetrics: deps.processMetrics })
  // The audit trail has its own destination and level (observability/audit.ts).
  const audit = createAudit(metrics, deps.auditStream ?? auditDestination(config.audit.log))
  // Deadlines of the public listener (limits/connections.ts).
  const deadlines = listenerDeadlines(config)
  const app = createServer(config, pino(loggerOptions(config.log.level), deps.logStream ?? process.stdout), audit, deadlines)
  for (const w of configWarnings(config)) app.log.warn({ component: 'config' }, w)

  // --- connections: global and per-address caps, deadlines, Connection: close
  // on denials, Expect: 100-continue (limits/connections.ts) -----------------
  const connections = guardConnections(app, config, metrics, deadlines)
  // --- observability (metrics, audit: created above) -----------------------
  observeRequests(app, metrics)
  const shared = createShared(app, config, metrics, deps.env ?? process.env)
  const { live, redis, store, revocations, keys } = shared

  // --- auth: onRequest, so it also guards WebSocket upgrades ---------------
  const failures = new AuthFailureLimiter(store, () => live.current.rateLimit.authFailures)
  await app.register(authPlugin, { live, config, keys, audit, failures, revocations })
  // After auth: a verified caller's connection stops counting as unauthenticated.
  app.addHook('onRequest', connections.afterAuth)

  // The issuer's back-channel logout (auth/logout.ts), when configured: on the public listener here
  // (the auth hook lets it through by its route mark), or on the admin listener below.
  const logout = config.auth.backchannelLogout
  const logoutDeps = { config, keys, revocations, audit, failures, redis }
  if (logout.path !== undefined && logout.listener === 'public') await registerBackchannelLogout(app, logout.path, logoutDeps)

  // --- limits: preHandler, so the verified sub exists; before the proxy ------
  await registerHttpLimits(app, { live, store, audit })
  // Last root hook before the proxy: auth, roles and limits have all passed (100 Continue goes out here).
  app.addHook('preHandler', connections.beforeProxy)

  // --- proxy: last, so every hook above applies to its routes --------------
  // The proxy streams bodies through its own catch-all parser, but Fastify's
  // built-in text/plain parser would still read a text/plain body whole before
  // the limits ran (and answer 413 beyond bodyLimit, 1 MiB), and keep an
  // `Expect: 100-continue` client waiting for a 100 that only comes after it.
  app.removeContentTypeParser('text/plain')
  await registerHttpProxy(app, config, metrics)
  const slots = new ConnectionSlots(redis, config.rateLimit.keyPrefix, () => live.current.ws.maxConnectionsPerUser, config.rateLimit.onStoreError, metrics, app.log)
  const messages = new WsMessageLimiter(store, () => live.current.ws.messageLimit)
  const ws = await registerWsProxy(app, { live, config, metrics, audit, messages, slots, revocations })

  // --- admin listener -------------------------------------------------------
  const readiness = readinessChecks(config, shared)
  const admin = buildAdmin({ logger: app.log, metrics, audit, readiness, revocations, adminToken: config.admin.token })
  if (logout.path !== undefined && logout.listener === 'admin') await registerBackchannelLogout(admin, logout.path, logoutDeps)
  return gateway({ app, admin, config, keys, metrics, audit, readiness, ws, revocations, live }, { redis, slots })
}

/** The public Fastify instance: logging, request ids, proxy trust, deadlines, TLS and the router's own errors. */
function createServer (config: Config, logger: pino.Logger, audit: Audit, deadlines: ListenerDeadlines): FastifyInstance {
  const tls = config.server.tls
  const app = Fastify({
    loggerInstance: logger,
    logController: new LogController({ disableRequestLogging: true }),
    trustProxy: proxyTrust(config.server.trustProxy), // a function, used by Fastify as it is (guardConnections builds the same)
    genReqId: requestIds(),
    childLoggerFactory: (logger, bindings, opts) => new LazyRequestLogger(logger as never, bindings, opts as Record<string, unknown>) as never,
    requestIdHeader: false,
    return503OnClosing: true,
    // A target Fastify's router cannot decode: answer as our own invalid_path,
    // never with Fastify's default body (it echoes the URL, token included).
    frameworkErrors: (err, request, reply) => {
      // These replies skip the onSend hooks: the 400's Connection: close is set here.
      (reply as FastifyReply).header('connection', 'close')
      if (err.code !== 'FST_ERR_BAD_URL') return send(reply as FastifyReply, UNROUTABLE)
      const transport = isWebSocketHandshake(request.raw) ? 'ws' : 'http'
      const a = authAnswer('invalid_path')
      audit.denied(request as FastifyRequest, { event: 'auth_failure', reason: 'invalid_path', transport, status: a.status })
      return send(reply as FastifyReply, a)
    },
    requestTimeout: deadlines.requestTimeout,
    keepAliveTimeout: deadlines.keepAliveTimeout,
    ...(tls !== undefined
      ? { https: { cert: readFileSync(tls.cert), key: readFileSync(tls.key), ...deadlines } }
      : { http: deadlines })
  }) as unknown as FastifyInstance

  // Node removes the socket's error listener before emitting 'upgrade'; a
  // client reset while auth is pending would be an unhandled 'error' event and
  // end the process.
  app.server.prependListener('upgrade', (_req: IncomingMessage, socket) => {
    socket.on('error', () => socket.destroy())
  })
  return app
}

/** Request ids on every answer, the request metrics, and the answers for errors and unknown methods. */
function observeRequests (app: FastifyInstance, metrics: Metrics): void {
  app.addHook('onRequest', (request, reply, done) => {
    reply.header('x-request-id', request.id)
    done()
  })
  app.addHook('onResponse', (request, reply, done) => {
    metrics.observeRequest(reply.statusCode, reply.elapsedTime / 1000)
    // An upgrade answered with a status (401/403/429/502...) owns a socket the
    // HTTP parser has let go of: nothing else would ever close it.
    if ((request.raw as IncomingMessage & { upgrade?: boolean }).upgrade === true) request.raw.socket.destroy()
    done()
  })
  app.setErrorHandler((err: Error & { statusCode?: number, code?: string }, request, reply) => {
    const status = err.statusCode !== undefined && err.statusCode >= 400 && err.statusCode < 600 ? err.statusCode : 500
    if (status >= 500) request.log.error({ err }, 'request failed')
    return send(reply, status >= 500 ? INTERNAL_ERROR : clientErrorAnswer(status, err.code))
  })
  app.setNotFoundHandler((_request, reply) => send(reply, METHOD_NOT_ALLOWED))
}

/** What several stages share: the reloadable config, Redis and the limit store on it, revocations and the key set. */
interface Shared {
  live: LiveConfig
  redis: ReturnType<typeof createRedis>
  store: LimitStore
  revocations: Revocations
  keys: KeyStore
}

function createShared (app: FastifyInstance, config: Config, metrics: Metrics, env: NodeJS.ProcessEnv): Shared {
  const live = new LiveConfig(config, env)
  live.onChange((c) => { app.log.level = c.log.level })
  const redis = createRedis(config.redis, app.log)
  const store = new LimitStore({
    redis,
    keyPrefix: config.rateLimit.keyPrefix,
    policy: config.rateLimit.onStoreError,
    fallbackMax: config.rateLimit.fallbackMax,
    metrics,
    log: app.log
  })
  const revocations = new Revocations({
    redis,
    announced: (result) => metrics.announcements.labels(result).inc(),
    keyPrefix: config.rateLimit.keyPrefix,
    minTtlMs: config.auth.revocationMinTtlMs,
    clockToleranceSec: config.auth.clockToleranceSec,
    log: app.log
  })
  const keys = new KeyStore({
    issuer: config.auth.issuer,
    jwksUrl: config.auth.jwksUrl,
    cacheTtlMs: config.auth.jwks.cacheTtlMs,
    minRefreshIntervalMs: config.auth.jwks.minRefreshIntervalMs,
    fetchTimeoutMs: config.auth.jwks.fetchTimeoutMs,
    metrics,
    log: app.log.child({ component: 'jwks' })
  })
  return { live, redis, store, revocations, keys }
}

/**
 * jwks: not ready until a key set has loaded (a failing refresh later only
 * shows in the detail); redis and revocations follow RATE_LIMIT_ON_STORE_ERROR
 * (README, Operations > Health).
 */
function readinessChecks (config: Config, { keys, redis, store, revocations }: Shared): Readiness {
  const readiness = new Readiness()
  readiness.add('jwks', () => keys.check())
  if (redis !== undefined) readiness.add('redis', () => store.check())
  if (redis !== undefined) readiness.add('revocations', () => revocations.check(config.rateLimit.onStoreError))
  return readiness
}

type GatewayParts = Omit<Gateway, 'start' | 'reload' | 'close'>

/** The assembled gateway with its lifecycle: start, reload, graceful close. */
function gateway (parts: GatewayParts, own: { redis: Shared['redis'], slots: ConnectionSlots }): Gateway {
  const { app, admin, config, keys, audit, readiness, ws, revocations, live } = parts
  let closing: Promise<void> | undefined
  return {
    ...parts,
    reload: () => {
      audit.reopen() // SIGHUP after log rotation: a file AUDIT_LOG is opened again
      return live.reload(app.log)
    },
    start: async () => {
      await Promise.all([keys.start(), own.redis !== undefined ? connectRedis(own.redis) : undefined])
      await revocations.start()
      if (config.server.configWatch) live.watch(app.log)
    },
    close () {
      closing ??= (async () => {
        readiness.draining = true
        ws.closeAll('gateway shutting down')
        await app.close()
        await admin.close()
        await keys.close()
        own.slots.close()
        live.close()
        revocations.close()
        own.redis?.disconnect()
        audit.flush()
      })()
      return closing
    }
  }
}
