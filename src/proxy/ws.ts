/**
 * WebSocket sessions, bridged with @fastify/websocket (not the proxy plugin's
 * `websocket: true`): the gateway owns both sockets, so it can refuse before
 * the 101, hold each client message until its limit check passed (order
 * kept), and close with its own codes, without private fields of `ws`.
 *
 * An upgrade is a GET routed through Fastify, so auth (onRequest) and the
 * request limit (preHandler) have run before anything here:
 *   route constraint `upgrade: websocket`: these routes, never the HTTP proxy's
 *   preHandler: take a connection slot (429 when the user has too many), then
 *               open the upstream WebSocket, so the app's refusal (4xx) or
 *               absence (502/504) reaches the client as a status before any
 *               101, and the client gets the app's subprotocol choice
 *   handler:    bridge both ways with bounded buffers; per-user message limit;
 *               close at token expiry, on revocation, when idle or silent
 */
import type { IncomingMessage } from 'node:http'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { LiveConfig } from '../config/live.js'
import type { Identity } from '../auth/identity.js'
import type { Revocation, Revocations } from '../auth/revocation.js'
import type { Audit } from '../observability/audit.js'
import type { Metrics, WsCloseReason, WsDirection } from '../observability/metrics.js'
import { appProtocols, BEARER_PROTOCOL, protocolsValid, protocolToken, stripQueryToken } from '../auth/token.js'
import type { ConnectionSlots, MessageVerdict, WsMessageLimiter } from '../limits/ws.js'
import { isExempt } from '../limits/http.js'
import { authChallenge } from '../auth/challenge.js'
import { send } from '../auth/plugin.js'
import { isWebSocketHandshake } from '../auth/transport.js'
import { upstreamWsHeaders } from './headers.js'
import { forwardContext } from './context.js'
import { UPSTREAM_ERROR_BODY, upstreamErrorStatus } from './errors.js'

/** Close codes the gateway sends. */
export const CLOSE = {
  normal: 1000,
  goingAway: 1001,
  policy: 1008,
  tooBig: 1009,
  tryAgainLater: 1013,
  badGateway: 1014
} as const

/** Client messages waiting for their limit check before the client is paused. */
export const MAX_PENDING_MESSAGES = 256
/** Slot id of exempt callers, who take no connection slot. */
const EXEMPT_SLOT = ''
/** Longest delay a Node timer takes; longer expiries re-arm. */
const MAX_TIMER_MS = 2_147_483_647
const JSON_TYPE = 'application/json; charset=utf-8'

interface Pending {
  target: WebSocket
  /** What the app sent before the client side existed (pause() does not stop frames already read). */
  early: Array<{ data: Buffer, binary: boolean }>
  onEarly: (data: Buffer, binary: boolean) => void
  /** Subprotocol to answer in the 101, false for none. */
  protocol: string | false
  slotId: string
  onClientGone: () => void
  startedAt: number
}

interface Session {
  client: WebSocket
  target: WebSocket
  request: FastifyRequest
  identity: Identity
  slotId: string
  ended: WsCloseReason | undefined
  lastActivity: number
  awaitingPong: boolean
  queue: Promise<void>
  pending: number
  pendingBytes: number
  expiryTimer: NodeJS.Timeout | undefined
}

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

const UPGRADE_CONSTRAINT = {
  name: 'upgrade',
  storage () {
    const handlers = new Map<string, unknown>()
    return {
      get: (v: string) => handlers.get(v) ?? null,
      set: (v: string, store: unknown) => { handlers.set(v, store) }
    }
  },
  // Only a real handshake (Node's req.upgrade: `Connection: Upgrade` too);
  // `Upgrade: websocket` alone on a keep-alive GET is an HTTP request.
  deriveConstraint (req: IncomingMessage): string | undefined {
    return isWebSocketHandshake(req) ? 'websocket' : undefined
  },
  mustMatchWhenDerived: true
}

/** A Sec-WebSocket-Key is 16 random bytes in base64 (RFC 6455 §4.1). */
const WS_KEY_RE = /^[+/0-9A-Za-z]{22}==$/

/**
 * What `ws` would refuse in the handshake, checked before a connection slot is
 * taken or the app is contacted: a description of the problem, or undefined.
 */
function handshakeProblem (request: FastifyRequest): string | undefined {
  const h = request.headers
  if (h['sec-websocket-version'] !== '13') return 'Sec-WebSocket-Version must be 13'
  const key = h['sec-websocket-key']
  if (typeof key !== 'string' || !WS_KEY_RE.test(key.trim())) return 'Invalid Sec-WebSocket-Key'
  if (!protocolsValid(h['sec-websocket-protocol'])) return 'Invalid or duplicated Sec-WebSocket-Protocol'
  return undefined
}

/** Codes a peer may legally send in a close frame. */
function sendable (code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999)
}

/** Passes one side's close to the other: same code when legal, none for 1005, `abnormal` otherwise. */
function relayClose (to: WebSocket, code: number, reason: Buffer, abnormal: number, abnormalText: string): void {
  if (to.readyState === WebSocket.CONNECTING) { to.terminate(); return }
  if (to.readyState !== WebSocket.OPEN) return
  if (sendable(code)) to.close(code, reason)
  else if (code === 1005) to.close()
  else to.close(abnormal, abnormalText)
}

export async function registerWsProxy (app: FastifyInstance, deps: WsDeps): Promise<WsBridge> {
  const { live, config, metrics, audit, messages, slots, revocations } = deps
  const ws = config.ws
  const base = config.upstream.url.replace(/^http/, 'ws').replace(/\/+$/, '')
  const pending = new WeakMap<IncomingMessage, Pending>()
  const sessions = new Set<Session>()
  const bySub = new Map<string, Set<Session>>()
  const toleranceMs = config.auth.clockToleranceSec * 1000

  app.addConstraintStrategy(UPGRADE_CONSTRAINT as Parameters<FastifyInstance['addConstraintStrategy']>[0])

  await app.register(websocket, {
    options: {
      maxPayload: ws.maxPayload,
      perMessageDeflate: false,
      handleProtocols: (_offered: Set<string>, req: IncomingMessage) => pending.get(req)?.protocol ?? false
    },
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

  function refuse (reply: FastifyReply, status: number, error: string, description: string): FastifyReply {
    return reply.code(status).type(JSON_TYPE).send(JSON.stringify({ error, error_description: description }))
  }

  async function connectUpstream (request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const identity = request.identity
    if (identity === null) {
      // A public path: WebSockets always need a verified caller (limits are per user).
      const c = authChallenge('missing_token')
      audit.denied(request, { event: 'auth_failure', reason: 'missing_token', transport: 'ws', status: c.status })
      return send(reply, c)
    }
    const problem = handshakeProblem(request)
    if (problem !== undefined) return refuse(reply, 400, 'invalid_request', problem)
    const exempt = isExempt(identity, live.current.rateLimit)
    const slot = exempt ? { result: 'ok' as const, id: EXEMPT_SLOT } : await slots.acquire(identity.sub)
    if (slot.result === 'full') {
      audit.denied(request, { event: 'rate_limited', reason: 'ws_connections', transport: 'ws', status: 429, sub: identity.sub })
      return reply.header('retry-after', 5).code(429).type(JSON_TYPE)
        .send(JSON.stringify({ error: 'rate_limited', error_description: `At most ${live.current.ws.maxConnectionsPerUser} WebSocket connections per user` }))
    }
    if (slot.result === 'unavailable') {
      return reply.header('retry-after', 1).code(503).type(JSON_TYPE)
        .send(JSON.stringify({ error: 'unavailable', error_description: 'Connection limits are temporarily unavailable' }))
    }

    try {
      return await openUpstream(request, reply, identity, slot.id)
    } catch (err) {
      // Whatever failed before the session existed, the slot goes back.
      releaseSlot(identity.sub, slot.id)
      throw err
    }
  }

  /**
   * Opens the app-side WebSocket for an admitted upgrade. On success the
   * client-side handshake (handler: bridge) takes it over; on any refusal the
   * slot is released here and the client gets a status.
   */
  async function openUpstream (request: FastifyRequest, reply: FastifyReply, identity: Identity, slotId: string): Promise<void> {
    const offered = request.headers['sec-websocket-protocol']
    const target = new WebSocket(base + stripQueryToken(request.url), appProtocols(offered), {
      headers: upstreamWsHeaders(request.headers, forwardContext(request, config)),
      handshakeTimeout: config.upstream.connectTimeoutMs,
      maxPayload: ws.maxPayload,
      perMessageDeflate: false,
      followRedirects: false
    })
    // What the app sends before the client side exists is kept, in order. The
    // listener must be attached inside 'open': frames that came with the 101 are
    // emitted on the next tick, before any promise continuation would run.
    const early: Pending['early'] = []
    const onEarly = (data: Buffer, binary: boolean): void => { early.push({ data, binary }) }
    const outcome = await new Promise<{ status: number } | null>((resolve) => {
      const onClientGone = (): void => { target.terminate(); resolve({ status: 0 }) }
      request.raw.socket.once('close', onClientGone)
      target.once('open', () => {
        target.on('message', onEarly)
        target.pause() // hold the rest until the client side exists
        request.raw.socket.removeListener('close', onClientGone)
        resolve(null)
      })
      target.once('unexpected-response', (_req, res) => {
        res.resume()
        const s = res.statusCode ?? 502
        resolve({ status: s >= 400 && s < 500 ? s : 502 })
        target.terminate()
      })
      target.on('error', (err: Error) => {
        if (target.readyState === WebSocket.OPEN) return // the bridge handles it
        resolve({ status: /timed out/i.test(err.message) ? 504 : 502 })
      })
    })
    if (outcome === null) {
      const token = protocolToken(offered)
      const onClientGone = (): void => { target.terminate(); releaseSlot(identity.sub, slotId) }
      request.raw.socket.once('close', onClientGone)
      pending.set(request.raw, {
        target,
        early,
        onEarly,
        protocol: target.protocol !== '' ? target.protocol : token !== undefined && token !== null ? BEARER_PROTOCOL : false,
        slotId,
        onClientGone,
        startedAt: performance.now()
      })
      return
    }
    releaseSlot(identity.sub, slotId)
    if (outcome.status === 0) return // client left; nothing to answer
    if (outcome.status >= 500) {
      const kind = outcome.status === 504 ? 'timeout' : 'connect'
      metrics.upstreamErrors.labels(kind, 'ws').inc()
      request.log.warn({ upstreamError: kind }, 'upstream websocket failed')
      const status = upstreamErrorStatus(kind)
      return reply.code(status).type(JSON_TYPE).send(UPSTREAM_ERROR_BODY[status])
    }
    return refuse(reply, outcome.status, 'upstream_refused', 'The app refused the WebSocket')
  }

  function bridge (client: WebSocket, request: FastifyRequest): void {
    const p = pending.get(request.raw)
    pending.delete(request.raw)
    const identity = request.identity
    if (p === undefined || identity === null) { client.close(CLOSE.badGateway, 'no upstream'); return }
    request.raw.socket.removeListener('close', p.onClientGone)
    const s: Session = {
      client,
      target: p.target,
      request,
      identity,
      slotId: p.slotId,
      ended: undefined,
      lastActivity: Date.now(),
      awaitingPong: false,
      queue: Promise.resolve(),
      pending: 0,
      pendingBytes: 0,
      expiryTimer: undefined
    }
    sessions.add(s)
    let forSub = bySub.get(identity.sub)
    if (forSub === undefined) { forSub = new Set(); bySub.set(identity.sub, forSub) }
    forSub.add(s)
    metrics.wsConnections.inc()
    metrics.observeRequest(101, (performance.now() - p.startedAt) / 1000)
    armExpiry(s)
    if (revocations.isRevoked(identity)) {
      audit.denied(request, { event: 'auth_failure', reason: 'revoked', transport: 'ws', status: CLOSE.policy, sub: identity.sub })
      terminateSession(s, 'revoked', CLOSE.policy, 'token revoked')
      return
    }

    const { target } = s
    target.removeListener('message', p.onEarly)
    for (const m of p.early) {
      metrics.wsMessages.app_to_client.inc()
      client.send(m.data, { binary: m.binary })
    }
    clientToApp(s)
    forward(target, client, 'app_to_client', s)

    client.on('pong', () => { s.awaitingPong = false })
    client.on('close', (code, reason) => {
      end(s, 'client_closed')
      relayClose(target, code, reason, CLOSE.goingAway, 'client went away')
    })
    target.on('close', (code, reason) => {
      end(s, 'upstream_closed')
      relayClose(client, code, reason, CLOSE.badGateway, 'upstream closed abnormally')
    })
    target.on('error', (err) => {
      request.log.debug({ err: { message: err.message } }, 'upstream websocket error')
      if (s.ended === undefined) metrics.upstreamErrors.labels('reset', 'ws').inc()
      end(s, 'upstream_error')
      if (client.readyState === WebSocket.OPEN) client.close(CLOSE.badGateway, 'upstream error')
    })
    client.on('error', (err: Error & { code?: string }) => {
      end(s, err.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH' ? 'message_too_big' : 'client_error')
      if (target.readyState === WebSocket.OPEN) target.close(CLOSE.goingAway, 'client error')
      else target.terminate()
    })
    target.resume()
  }

  function releaseSlot (sub: string, id: string): void {
    if (id !== EXEMPT_SLOT) slots.release(sub, id)
  }

  /** Marks the session over (first reason wins) and frees what it held. */
  function end (s: Session, reason: WsCloseReason): void {
    if (s.ended !== undefined) return
    s.ended = reason
    clearTimeout(s.expiryTimer)
    sessions.delete(s)
    const forSub = bySub.get(s.identity.sub)
    forSub?.delete(s)
    if (forSub?.size === 0) bySub.delete(s.identity.sub)
    releaseSlot(s.identity.sub, s.slotId)
    metrics.wsConnections.dec()
    metrics.wsCloses.labels(reason).inc()
  }

  /** The gateway ends a session: the client gets `code`, the app a normal close. */
  function terminateSession (s: Session, reason: WsCloseReason, code: number, text: string): void {
    end(s, reason)
    if (s.client.readyState === WebSocket.OPEN) s.client.close(code, text)
    else s.client.terminate()
    if (s.target.readyState === WebSocket.OPEN) s.target.close(CLOSE.goingAway, text)
    else s.target.terminate()
  }

  function armExpiry (s: Session): void {
    const due = s.identity.exp * 1000 + toleranceMs - Date.now()
    s.expiryTimer = setTimeout(() => {
      if (s.identity.exp * 1000 + toleranceMs > Date.now()) return armExpiry(s) // clamped timer: not due yet
      audit.denied(s.request, { event: 'auth_failure', reason: 'expired', transport: 'ws', status: CLOSE.policy, sub: s.identity.sub })
      terminateSession(s, 'token_expired', CLOSE.policy, 'token expired')
    }, Math.min(Math.max(due, 0), MAX_TIMER_MS))
  }

  /**
   * Client messages wait for their limit verdict in order, so allowed
   * messages reach the app in order and the one over the limit never does.
   * With nothing waiting and a store that answers at once (in-process), a
   * message goes on inside its own event; otherwise it joins a per-session
   * promise chain. Too many waiting -> the client is paused.
   */
  function clientToApp (s: Session): void {
    const { client, target } = s
    const counter = metrics.wsMessages.client_to_app
    const drained = (): void => {
      if (client.isPaused && s.pending < MAX_PENDING_MESSAGES / 2 && s.pendingBytes + target.bufferedAmount < ws.maxBuffered / 2) client.resume()
    }
    if (s.slotId === EXEMPT_SLOT) {
      forward(client, target, 'client_to_app', s) // exempt: no message limit
      return
    }
    /** The verdict for one message: forward it, refuse it, or end the session when the store refused. */
    const settle = (verdict: MessageVerdict | undefined, data: Buffer, isBinary: boolean, size: number): void => {
      s.pending--
      s.pendingBytes -= size
      if (verdict === undefined) {
        // Store refused (RATE_LIMIT_ON_STORE_ERROR=closed): cannot vouch for the message.
        if (s.ended === undefined) terminateSession(s, 'rate_limited', CLOSE.tryAgainLater, 'rate limiting unavailable')
        return
      }
      if (s.ended !== undefined || target.readyState !== WebSocket.OPEN) return
      if (verdict.allowed) {
        counter.inc()
        target.send(data, { binary: isBinary }, drained)
        if (target.bufferedAmount > ws.maxBuffered && !client.isPaused) client.pause()
        else drained()
        return
      }
      overLimit(s, verdict.retryAfterSec)
      drained()
    }
    client.on('message', (raw, isBinary) => {
      const data = raw as Buffer
      s.lastActivity = Date.now()
      const idle = s.pending === 0
      s.pending++
      const size = data.length
      s.pendingBytes += size
      if ((s.pending >= MAX_PENDING_MESSAGES || s.pendingBytes + target.bufferedAmount > ws.maxBuffered) && !client.isPaused) client.pause()
      if (idle) {
        let sync = true
        let answered = false
        let answer: MessageVerdict | undefined
        let release: (() => void) | undefined
        messages.check(s.identity.sub, (_err, verdict) => {
          if (sync) { answered = true; answer = verdict; return }
          release?.() // the next message's check starts after this (a microtask): order is kept
          settle(verdict, data, isBinary, size)
        })
        sync = false
        if (answered) settle(answer, data, isBinary, size)
        else s.queue = new Promise((resolve) => { release = resolve }) // later messages wait for this one
        return
      }
      s.queue = s.queue.then(() => new Promise<void>((resolve) => {
        messages.check(s.identity.sub, (_err, verdict) => {
          resolve()
          settle(verdict, data, isBinary, size)
        })
      }))
    })
  }

  /**
   * A client message over the limit: one audit line and one
   * resonance_rate_limit_triggered_total{transport="ws"} per message refused.
   * `close` ends the connection (status 1008); `drop` keeps it, so its line
   * has status 429, the status the client's notice stands for.
   */
  function overLimit (s: Session, retryAfterSec: number): void {
    if (live.current.ws.messageLimit.action === 'close') {
      audit.denied(s.request, { event: 'rate_limited', reason: 'ws_message_limit', transport: 'ws', status: CLOSE.policy, action: 'close', sub: s.identity.sub })
      terminateSession(s, 'rate_limited', CLOSE.policy, 'message rate limit exceeded')
      return
    }
    audit.denied(s.request, { event: 'rate_limited', reason: 'ws_message_limit', transport: 'ws', status: 429, action: 'drop', sub: s.identity.sub })
    if (s.client.readyState === WebSocket.OPEN) {
      s.client.send(JSON.stringify({ error: 'rate_limited', error_description: 'message dropped: rate limit exceeded', retry_after: retryAfterSec }))
    }
  }

  /** app -> client with backpressure: the app side pauses while the client has too much queued. */
  function forward (src: WebSocket, dst: WebSocket, direction: WsDirection, s: Session): void {
    const counter = metrics.wsMessages[direction]
    const drained = (): void => {
      if (src.isPaused && dst.bufferedAmount < ws.maxBuffered / 2) src.resume()
    }
    src.on('message', (data, isBinary) => {
      s.lastActivity = Date.now()
      if (dst.readyState !== WebSocket.OPEN) return
      counter.inc()
      dst.send(data as Buffer, { binary: isBinary }, drained)
      if (dst.bufferedAmount > ws.maxBuffered && !src.isPaused) src.pause()
    })
  }

  revocations.onRevoked((r: Revocation) => {
    const hit = (s: Session): boolean => r.kind === 'jti'
      ? s.identity.jti === r.value
      : s.identity.iat === undefined || s.identity.iat <= r.at
    const candidates = r.kind === 'sub' ? [...(bySub.get(r.value) ?? [])] : [...sessions]
    for (const s of candidates) {
      if (!hit(s)) continue
      audit.denied(s.request, { event: 'auth_failure', reason: 'revoked', transport: 'ws', status: CLOSE.policy, sub: s.identity.sub })
      terminateSession(s, 'revoked', CLOSE.policy, 'token revoked')
    }
  })

  // Liveness: ping every interval; a client that did not answer the last ping is gone.
  const pinger = setInterval(() => {
    for (const s of sessions) {
      // A client we paused (backpressure) cannot have its pong read: not a dead client.
      if (s.client.isPaused) { s.awaitingPong = false; continue }
      if (s.awaitingPong) { terminateSession(s, 'ping_timeout', CLOSE.goingAway, 'ping timeout'); continue }
      s.awaitingPong = true
      s.client.ping()
    }
  }, ws.pingIntervalMs)
  pinger.unref()
  let idleTick: NodeJS.Timeout | undefined
  if (ws.idleTimeoutMs > 0) {
    idleTick = setInterval(() => {
      const cutoff = Date.now() - ws.idleTimeoutMs
      for (const s of sessions) if (s.lastActivity < cutoff) terminateSession(s, 'idle_timeout', CLOSE.normal, 'idle timeout')
    }, Math.max(250, Math.min(ws.idleTimeoutMs / 4, 30_000)))
    idleTick.unref()
  }
  app.addHook('onClose', (_app, done) => {
    clearInterval(pinger)
    clearInterval(idleTick)
    done()
  })

  function closeAll (reason: string): void {
    for (const s of [...sessions]) terminateSession(s, 'shutdown', CLOSE.goingAway, reason)
  }

  for (const url of ['/', '/*']) {
    app.route({
      method: 'GET',
      url,
      constraints: { upgrade: 'websocket' },
      websocket: true,
      preHandler: connectUpstream,
      handler: bridge as never
    })
  }

  return {
    closeAll,
    get open () { return sessions.size }
  }
}
