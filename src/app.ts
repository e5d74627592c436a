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
import type { IncomingMessage, ServerResponse } from 'node:http'
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import pino, { type DestinationStream } from 'pino'
import type { Config } from './config/load.js'
import { configWarnings } from './config/load.js'
import { LiveConfig, type ReloadResult } from './config/live.js'
import { LazyRequestLogger, loggerOptions } from './observability/logger.js'
import { createMetrics, type Metrics } from './observability/metrics.js'
import { createAudit, type Audit } from './observability/audit.js'
import { KeyStore } from './auth/keys.js'
import authPlugin, { send } from './auth/plugin.js'
import { authChallenge } from './auth/challenge.js'
import { registerHttpProxy } from './proxy/http.js'
import { registerWsProxy, type WsBridge } from './proxy/ws.js'
import { buildAdmin } from './admin/plugin.js'
import { Readiness } from './admin/readiness.js'
import { connectRedis, createRedis, redisCheck } from './limits/redis.js'
import { LimitStore } from './limits/store.js'
import { AuthFailureLimiter } from './limits/auth-failures.js'
import { registerHttpLimits } from './limits/http.js'
import { ConnectionSlots, WsMessageLimiter } from './limits/ws.js'
import { ConnectionGuard, effectiveMaxConnections, readNofile } from './limits/connections.js'
import { Revocations } from './auth/revocation.js'

export interface GatewayDeps {
  /** Where logs go (default stdout); tests capture them here. */
  logStream?: DestinationStream
  /** The environment the config was loaded from; reloads read it again (default process.env). */
  env?: NodeJS.ProcessEnv
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
 * New request ids: a random per-process prefix (64 bits, so replicas never
 * collide) and a counter. As unique as a UUID per request for tracing, at a
 * fraction of its cost (randomUUID showed up in the request profile).
 */
const ID_PREFIX = randomBytes(8).toString('hex')
let idCounter = 0

/** A caller-supplied X-Request-Id is kept when it is sane, otherwise a new one. */
function requestId (req: IncomingMessage): string {
  const h = req.headers['x-request-id']
  return typeof h === 'string' && REQUEST_ID_RE.test(h) ? h : `${ID_PREFIX}-${(++idCounter).toString(36)}`
}

/**
 * Node checks request and header deadlines only every
 * `connectionsCheckingInterval` (30 s by default), so a 10 s headersTimeout
 * could let a connection live 40 s: check at least twice per headersTimeout,
 * and at least every second.
 */
export function connectionsCheckingInterval (headersTimeoutMs: number): number {
  return Math.max(50, Math.min(1000, Math.floor(headersTimeoutMs / 2)))
}

/**
 * A response that must end its connection instead of keeping it alive:
 * - any status >= 400 while the request's declared body was not read to its
 *   end: Node would otherwise keep reading (and discarding) it, for as long as
 *   the client dribbles it;
 * - a 400 or 401 the gateway produced itself (not the app's): whoever sent it
 *   is not a client worth a kept-alive connection.
 */
function mustClose (request: FastifyRequest, status: number, forwarded: boolean): boolean {
  if (status < 400) return false
  if (!forwarded && (status === 400 || status === 401)) return true
  const raw = request.raw
  if (raw.complete) return false
  const length = raw.headers['content-length']
  return (length !== undefined && length !== '0') || raw.headers['transfer-encoding'] !== undefined
}

export async function buildGateway (config: Config, deps: GatewayDeps = {}): Promise<Gateway> {
  const logger = pino(loggerOptions(config.log.level), deps.logStream ?? process.stdout)
  const tls = config.server.tls
  const metrics = createMetrics()
  const audit = createAudit(metrics)
  // Deadlines of the public listener. Fastify sets requestTimeout and
  // keepAliveTimeout itself (its requestTimeout default 0 turns Node's off);
  // headersTimeout and the checking interval only exist as server options,
  // which Fastify passes as `http` (plain) or inside `https` (TLS).
  const listenerOptions = {
    requestTimeout: config.server.requestTimeoutMs,
    headersTimeout: config.server.headersTimeoutMs,
    keepAliveTimeout: config.server.keepAliveTimeoutMs,
    connectionsCheckingInterval: connectionsCheckingInterval(config.server.headersTimeoutMs)
  }
  const app = Fastify({
    loggerInstance: logger,
    logController: new LogController({ disableRequestLogging: true }),
    trustProxy: config.server.trustProxy as boolean, // Fastify accepts a hop count too; its types omit it
    genReqId: requestId,
    childLoggerFactory: (logger, bindings, opts) => new LazyRequestLogger(logger as never, bindings, opts as Record<string, unknown>) as never,
    requestIdHeader: false,
    return503OnClosing: true,
    // A target Fastify's router cannot decode: answer as our own invalid_path,
    // never with Fastify's default body (it echoes the URL, token included).
    frameworkErrors: (err, request, reply) => {
      // These replies skip the onSend hooks: the 400's Connection: close is set here.
      (reply as FastifyReply).header('connection', 'close')
      if (err.code === 'FST_ERR_BAD_URL') {
        const transport = request.headers.upgrade?.toLowerCase() === 'websocket' ? 'ws' : 'http'
        const c = authChallenge('invalid_path')
        audit.denied(request as FastifyRequest, { event: 'auth_failure', reason: 'invalid_path', transport, status: c.status })
        return send(reply as FastifyReply, c)
      }
      return (reply as FastifyReply).code(400).type('application/json; charset=utf-8')
        .send(JSON.stringify({ error: 'bad_request', error_description: 'The request could not be routed' }))
    },
    requestTimeout: listenerOptions.requestTimeout,
    keepAliveTimeout: listenerOptions.keepAliveTimeout,
    ...(tls !== undefined
      ? { https: { cert: readFileSync(tls.cert), key: readFileSync(tls.key), ...listenerOptions } }
      : { http: listenerOptions })
  }) as unknown as FastifyInstance
  for (const w of configWarnings(config)) app.log.warn({ component: 'config' }, w)

  // --- connection budget: global and per-address caps (limits/connections.ts) ---
  const maxConnections = effectiveMaxConnections(config.server.maxConnections, config.upstream.connections, readNofile())
  const guard = new ConnectionGuard(app.server, {
    maxConnections: maxConnections.max,
    maxUnauthenticatedPerIp: config.server.maxUnauthenticatedPerIp,
    metrics
  })
  app.log.info({
    component: 'connections',
    maxConnections: maxConnections.max,
    maxConnectionsSource: maxConnections.source,
    nofile: maxConnections.nofile,
    maxUnauthenticatedPerIp: config.server.maxUnauthenticatedPerIp,
    requestTimeoutMs: listenerOptions.requestTimeout,
    headersTimeoutMs: listenerOptions.headersTimeout,
    keepAliveTimeoutMs: listenerOptions.keepAliveTimeout
  }, 'connection limits')
  if (config.server.maxUnauthenticatedPerIp >= maxConnections.max) {
    app.log.warn({ component: 'config' }, `server.maxUnauthenticatedPerIp (MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP, ${config.server.maxUnauthenticatedPerIp}) is not below the connection cap (${maxConnections.max}): one client address without a token can take every connection.`)
  }

  // Expect: 100-continue. Without a 'checkContinue' listener Node answers
  // 100 Continue before any hook ran, inviting the body of a request that is
  // then denied. Here the request goes through the pipeline like any other;
  // the 100 is written just before forwarding (the preHandler below), and a
  // denial goes out without it (Node then closes the connection).
  const wantsContinue = new WeakSet<IncomingMessage>()
  app.server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => {
    wantsContinue.add(req)
    app.routing(req, res)
  })

  // Node removes the socket's error listener before emitting 'upgrade'; a
  // client reset while auth is pending must not crash the process (STACK-NOTES §2).
  app.server.prependListener('upgrade', (_req: IncomingMessage, socket) => {
    socket.on('error', () => socket.destroy())
  })

  // --- observability (metrics, audit: created above) -----------------------
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
  // Requests that passed auth and limits and were handed to the proxy: their
  // 4xx are the app's (or the proxy's 502/504), not the gateway's denials.
  const forwarded = new WeakSet<FastifyRequest>()
  app.addHook('onSend', (request, reply, payload, done) => {
    if (mustClose(request, reply.statusCode, forwarded.has(request))) reply.header('connection', 'close')
    // A 403 (missing role) still verified the caller: the connection is not anonymous.
    // request.raw.socket is null once a body was read to its end; the response keeps it until finished.
    if (request.identity !== null) guard.authenticated(reply.raw.socket)
    done(null, payload)
  })
  app.setErrorHandler((err: Error & { statusCode?: number, code?: string }, request, reply) => {
    const status = err.statusCode !== undefined && err.statusCode >= 400 && err.statusCode < 600 ? err.statusCode : 500
    if (status >= 500) request.log.error({ err }, 'request failed')
    return reply.code(status).type('application/json; charset=utf-8')
      .send(JSON.stringify(status >= 500
        ? { error: 'internal_error', error_description: 'The gateway failed to handle the request' }
        : { error: 'bad_request', error_description: err.code ?? 'invalid request' }))
  })
  app.setNotFoundHandler((_request, reply) =>
    reply.code(405).type('application/json; charset=utf-8')
      .send(JSON.stringify({ error: 'method_not_allowed', error_description: 'The gateway does not forward this method' })))

  // --- limits' shared store: Redis (or in-process), used by auth and limits --
  const redis = createRedis(config.redis, app.log)
  const store = new LimitStore({
    redis,
    keyPrefix: config.rateLimit.keyPrefix,
    policy: config.rateLimit.onStoreError,
    fallbackMax: config.rateLimit.fallbackMax,
    metrics,
    log: app.log
  })
  const live = new LiveConfig(config, deps.env ?? process.env)
  live.onChange((c) => { app.log.level = c.log.level })
  const failures = new AuthFailureLimiter(store, () => live.current.rateLimit.authFailures)
  const revocations = new Revocations({
    redis,
    keyPrefix: config.rateLimit.keyPrefix,
    minTtlMs: config.auth.revocationMinTtlMs,
    clockToleranceSec: config.auth.clockToleranceSec,
    log: app.log
  })

  // --- auth: onRequest, so it also guards WebSocket upgrades ---------------
  const keys = new KeyStore({
    issuer: config.auth.issuer,
    jwksUrl: config.auth.jwksUrl,
    cacheTtlMs: config.auth.jwks.cacheTtlMs,
    minRefreshIntervalMs: config.auth.jwks.minRefreshIntervalMs,
    fetchTimeoutMs: config.auth.jwks.fetchTimeoutMs,
    metrics,
    log: app.log.child({ component: 'jwks' })
  })
  await app.register(authPlugin, { live, config, keys, audit, failures, revocations })
  // After auth: a verified caller's connection stops counting as unauthenticated
  // (HTTP and WebSocket upgrades alike), before the request runs its course.
  app.addHook('onRequest', (request, _reply, done) => {
    if (request.identity !== null) guard.authenticated(request.raw.socket)
    done()
  })

  // --- limits: preHandler, so the verified sub exists; before the proxy ------
  await registerHttpLimits(app, { live, store, audit })
  // Last root hook before the HTTP proxy's handler: auth, roles and limits have all passed.
  app.addHook('preHandler', (request, reply, done) => {
    forwarded.add(request)
    if (wantsContinue.has(request.raw)) (reply.raw as ServerResponse).writeContinue()
    done()
  })

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
  const readiness = new Readiness()
  readiness.add('jwks', () => keys.ready
    ? { ok: true, detail: `${keys.size} keys` }
    : { ok: false, detail: keys.error ?? 'not loaded yet' })
  if (redis !== undefined) readiness.add('redis', () => redisCheck(redis))
  const admin = buildAdmin({ logger: app.log, metrics, readiness, revocations, adminToken: config.admin.token })

  let closing: Promise<void> | undefined
  return {
    app,
    admin,
    config,
    keys,
    metrics,
    audit,
    readiness,
    ws,
    revocations,
    live,
    reload: () => live.reload(app.log),
    start: async () => {
      await Promise.all([keys.start(), redis !== undefined ? connectRedis(redis) : undefined])
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
        slots.close()
        live.close()
        revocations.close()
        redis?.disconnect()
      })()
      return closing
    }
  }
}
