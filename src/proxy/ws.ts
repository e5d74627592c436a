/**
 * WebSocket sessions: @fastify/websocket routes each upgrade request through
 * Fastify (so auth, onRequest, and the request limit, preHandler, have run
 * before anything here); the gateway then does both handshakes itself and
 * relays bytes (not the proxy plugin's `websocket: true`, which decodes and
 * re-frames every message with `ws`). It owns both sockets, so it can refuse
 * before the 101, hold each client message until its limit check passed
 * (order kept), and close with its own codes. The parts:
 *   ws-route.ts         route constraint, then (preHandler) caller, handshake,
 *                       connection slot and the app-side handshake, all before
 *                       the 101 it writes
 *   ws-session.ts       the byte relay: bounded buffers, closes, pings
 *   ws-frames.ts        frame headers (RFC 6455 §5), read as they stream by
 *   auth/ws-guard.ts    close at token expiry and on revocation
 *   limits/ws-gate.ts   connection slots; per-user message limit, in order
 * This file wires them and runs the liveness timers (ping, idle) and shutdown.
 */
import websocket from '@fastify/websocket'
import type WebSocket from 'ws'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { LiveConfig } from '../config/live.js'
import type { Revocations } from '../auth/revocation.js'
import { WsGuard } from '../auth/ws-guard.js'
import { requesterOf, type Audit } from '../observability/audit.js'
import type { Metrics } from '../observability/metrics.js'
import type { ConnectionSlots, WsMessageLimiter } from '../limits/ws.js'
import { WsLimits } from '../limits/ws-gate.js'
import { CLOSE } from '../http/ws-close.js'
import { UPGRADE_CONSTRAINT, Upgrades, type Opened } from './ws-route.js'
import { WsSession } from './ws-session.js'

export { CLOSE } from '../http/ws-close.js'
export { MAX_PENDING_MESSAGES } from './ws-session.js'

export interface WsBridge {
  /** Closes every proxied connection with 1001 (shutdown). */
  closeAll (reason: string): void
  readonly open: number
}

export interface WsDeps {
  /** Message-limit action and connection cap are read from here per use (reloadable). */
  live: LiveConfig
  config: Config
  metrics: Metrics
  audit: Audit
  messages: WsMessageLimiter
  slots: ConnectionSlots
  revocations: Revocations
}

export async function registerWsProxy (app: FastifyInstance, deps: WsDeps): Promise<WsBridge> {
  const { live, config, metrics, audit, messages, slots, revocations } = deps
  const guard = new WsGuard<WsSession>(revocations, audit, config.auth.clockToleranceSec * 1000)
  const limits = new WsLimits({ live, slots, messages, audit })
  const hooks = { metrics, log: app.log, maxBuffered: config.ws.maxBuffered, maxPayload: config.ws.maxPayload, onEnd: (s: WsSession) => { guard.forget(s) } }
  const upgrades = new Upgrades({ config, metrics, guard, limits, opened })
  app.server.prependListener('upgrade', upgrades.onUpgrade)

  app.addConstraintStrategy(UPGRADE_CONSTRAINT as Parameters<FastifyInstance['addConstraintStrategy']>[0])

  // Used for its upgrade routing only: the preHandler answers every upgrade
  // (a status, or its own 101), so the `ws` server never takes a connection.
  await app.register(websocket, {
    options: { maxPayload: config.ws.maxPayload, perMessageDeflate: false },
    errorHandler: (err: Error, socket: WebSocket, request: FastifyRequest) => {
      request.log.debug({ err: { message: err.message } }, 'websocket error')
      socket.terminate()
    },
    // Shutdown closes are sent by closeAll() with 1001; this only stops the server.
    preClose: function (this: FastifyInstance, done: () => void) {
      closeAll('gateway shutting down')
      this.websocketServer.close(() => done())
    }
  })

  /** Both handshakes done: the sockets become a session. */
  function opened (o: Opened): void {
    const identity = o.request.identity
    if (identity === null) { o.client.destroy(); o.app.destroy(); o.slot.release(); return }
    const s = new WsSession(o.client, o.app, requesterOf(o.request), identity, o.slot, hooks)
    metrics.wsConnections.inc()
    metrics.observeRequest(101, (performance.now() - o.startedAt) / 1000)
    if (!guard.watch(s)) return // revoked meanwhile: closed
    s.start(o.clientHead, o.appHead, limits.gate(s, o.slot))
  }

  /** Not reached: the preHandler answers every upgrade. */
  function unanswered (client: WebSocket): void {
    client.close(CLOSE.badGateway, 'no upstream')
  }

  function closeAll (reason: string): void {
    for (const s of [...guard.sessions]) s.terminate('shutdown', CLOSE.goingAway, reason)
  }

  const stopLiveness = livenessTimers(guard.sessions, config.ws)
  app.addHook('onClose', (_app, done) => {
    stopLiveness()
    done()
  })

  for (const url of ['/', '/*']) {
    app.route({
      method: 'GET',
      url,
      constraints: { upgrade: 'websocket' },
      websocket: true,
      preHandler: upgrades.preHandler,
      handler: unanswered as never
    })
  }

  return {
    closeAll,
    get open () { return guard.sessions.size }
  }
}

/**
 * Pings every session each interval (a client that did not answer the last
 * ping is gone) and, with an idle timeout, closes sessions with no message
 * either way for that long. Returns the function that stops both timers.
 */
function livenessTimers (sessions: ReadonlySet<WsSession>, ws: Config['ws']): () => void {
  const pinger = setInterval(() => {
    for (const s of sessions) s.ping()
  }, ws.pingIntervalMs)
  pinger.unref()
  let idleTick: NodeJS.Timeout | undefined
  if (ws.idleTimeoutMs > 0) {
    idleTick = setInterval(() => {
      const cutoff = Date.now() - ws.idleTimeoutMs
      for (const s of sessions) if (s.lastActivity < cutoff) s.terminate('idle_timeout', CLOSE.normal, 'idle timeout')
    }, Math.max(250, Math.min(ws.idleTimeoutMs / 4, 30_000)))
    idleTick.unref()
  }
  return () => {
    clearInterval(pinger)
    clearInterval(idleTick)
  }
}
