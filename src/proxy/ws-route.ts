/**
 * The upgrade side of the WebSocket bridge, everything before the 101:
 *   route constraint `upgrade: websocket`: the bridge's routes take real
 *               handshakes only, never the HTTP proxy's requests;
 *   preHandler: a verified caller (ws-guard), a valid handshake, a connection
 *               slot (ws-gate), then the upstream WebSocket, so the app's
 *               refusal (4xx) or absence (502/504) reaches the client as a
 *               status before any 101, and the client gets the app's
 *               subprotocol choice.
 * An admitted upgrade leaves an Upstream for the handler (take()).
 */
import type { IncomingMessage } from 'node:http'
import WebSocket from 'ws'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { GuardedSession, WsGuard } from '../auth/ws-guard.js'
import { appProtocols, BEARER_PROTOCOL, protocolsValid, protocolToken, stripQueryToken } from '../auth/token.js'
import { isWebSocketHandshake } from '../auth/transport.js'
import type { Metrics } from '../observability/metrics.js'
import type { Slot, WsLimits } from '../limits/ws-gate.js'
import { upstreamWsHeaders } from './headers.js'
import { forwardContext } from './context.js'
import { upstreamErrorStatus } from './errors.js'
import { badHandshakeAnswer, send, UPSTREAM_FAILED, upstreamRefusedAnswer } from '../http/answers.js'
import type { EarlyMessage } from './ws-session.js'

/** An open app-side WebSocket waiting for the client-side handshake. */
export interface Upstream {
  target: WebSocket
  /** What the app sent before the client side existed (pause() does not stop frames already read). */
  early: EarlyMessage[]
  onEarly: (data: Buffer, binary: boolean) => void
  /** Subprotocol to answer in the 101, false for none. */
  protocol: string | false
  slot: Slot
  onClientGone: () => void
  startedAt: number
}

export const UPGRADE_CONSTRAINT = {
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

export interface UpgradeDeps {
  config: Config
  metrics: Metrics
  guard: Pick<WsGuard<GuardedSession>, 'caller'>
  limits: WsLimits
}

export class Upgrades {
  private readonly pending = new WeakMap<IncomingMessage, Upstream>()
  private readonly base: string

  constructor (private readonly deps: UpgradeDeps) {
    this.base = deps.config.upstream.url.replace(/^http/, 'ws').replace(/\/+$/, '')
  }

  /** The subprotocol to answer in the 101 (the handshake's handleProtocols). */
  protocol (req: IncomingMessage): string | false {
    return this.pending.get(req)?.protocol ?? false
  }

  /** The upstream admitted for this request, handed over once. */
  take (request: FastifyRequest): Upstream | undefined {
    const p = this.pending.get(request.raw)
    this.pending.delete(request.raw)
    if (p !== undefined) request.raw.socket.removeListener('close', p.onClientGone)
    return p
  }

  /** The route's preHandler: admit the upgrade and connect the app, or answer with a status. */
  readonly preHandler = async (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply | undefined> => {
    // WebSockets always need a verified caller (limits are per user), on public paths too.
    const identity = this.deps.guard.caller(request, reply)
    if (identity === null) return reply
    const problem = handshakeProblem(request)
    if (problem !== undefined) return send(reply, badHandshakeAnswer(problem))
    const slot = await this.deps.limits.admit(request, reply, identity)
    if (slot === undefined) return reply
    try {
      return await this.open(request, reply, slot)
    } catch (err) {
      // Whatever failed before the session existed, the slot goes back.
      slot.release()
      throw err
    }
  }

  /**
   * Opens the app-side WebSocket for an admitted upgrade. On success the
   * client-side handshake (the route's handler) takes it over; on any refusal
   * the slot is released here and the client gets a status.
   */
  private async open (request: FastifyRequest, reply: FastifyReply, slot: Slot): Promise<FastifyReply | undefined> {
    const offered = request.headers['sec-websocket-protocol']
    const { config } = this.deps
    const target = new WebSocket(this.base + stripQueryToken(request.url), appProtocols(offered), {
      headers: upstreamWsHeaders(request.headers, forwardContext(request, config)),
      handshakeTimeout: config.upstream.connectTimeoutMs,
      maxPayload: config.ws.maxPayload,
      perMessageDeflate: false,
      followRedirects: false
    })
    // What the app sends before the client side exists is kept, in order. The
    // listener must be attached inside 'open': frames that came with the 101 are
    // emitted on the next tick, before any promise continuation would run.
    const early: EarlyMessage[] = []
    const onEarly = (data: Buffer, binary: boolean): void => { early.push({ data, binary }) }
    const status = await dial(request, target, onEarly)
    if (status === null) {
      const token = protocolToken(offered)
      const onClientGone = (): void => { target.terminate(); slot.release() }
      request.raw.socket.once('close', onClientGone)
      this.pending.set(request.raw, {
        target,
        early,
        onEarly,
        protocol: target.protocol !== '' ? target.protocol : token !== undefined && token !== null ? BEARER_PROTOCOL : false,
        slot,
        onClientGone,
        startedAt: performance.now()
      })
      return
    }
    slot.release()
    if (status === 0) return // client left; nothing to answer
    return this.failed(request, reply, status)
  }

  /** The client's answer when the app refused (4xx) or could not be reached (502/504). */
  private failed (request: FastifyRequest, reply: FastifyReply, status: number): FastifyReply {
    if (status >= 500) {
      const kind = status === 504 ? 'timeout' : 'connect'
      this.deps.metrics.upstreamErrors.labels(kind, 'ws').inc()
      request.log.warn({ upstreamError: kind }, 'upstream websocket failed')
      const answer = upstreamErrorStatus(kind)
      return send(reply, UPSTREAM_FAILED[answer])
    }
    return send(reply, upstreamRefusedAnswer(status))
  }
}

/**
 * Waits for the app-side handshake: null when open (its messages from then on
 * go to `onEarly`, the rest is paused), else the status for the client (0:
 * the client left first).
 */
function dial (request: FastifyRequest, target: WebSocket, onEarly: (data: Buffer, binary: boolean) => void): Promise<number | null> {
  return new Promise<number | null>((resolve) => {
    const onClientGone = (): void => { target.terminate(); resolve(0) }
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
      resolve(s >= 400 && s < 500 ? s : 502)
      target.terminate()
    })
    target.on('error', (err: Error) => {
      if (target.readyState === WebSocket.OPEN) return // the bridge handles it
      resolve(/timed out/i.test(err.message) ? 504 : 502)
    })
  })
}
