/**
 * One bridged WebSocket session: the client's socket and the app's, joined
 * both ways with bounded buffers (a side whose peer has more than
 * WS_MAX_BUFFERED queued is paused), closes relayed with their codes, and
 * what the gateway's liveness timers check (the ping round, the time of the
 * last message). Client messages pass the session's message gate first, when
 * it has one (not for exempt callers).
 */
import type { FastifyRequest } from 'fastify'
import WebSocket from 'ws'
import type { Identity } from '../auth/identity.js'
import type { Metrics, WsCloseReason, WsDirection } from '../observability/metrics.js'
import { CLOSE, sendable } from '../http/ws-close.js'
import type { MessageGate, MessageOutcome, Slot } from '../limits/ws-gate.js'

/** Client messages waiting for their limit check before the client is paused. */
export const MAX_PENDING_MESSAGES = 256

/** A message the app sent before the client side existed. */
export interface EarlyMessage { data: Buffer, binary: boolean }

export interface SessionHooks {
  metrics: Metrics
  /** Bytes queued towards one side before the other side is paused. */
  maxBuffered: number
  /** Called once, when the session ends (first reason). */
  onEnd (s: WsSession): void
}

/** Passes one side's close to the other: same code when legal, none for 1005, `abnormal` otherwise. */
function relayClose (to: WebSocket, code: number, reason: Buffer, abnormal: number, abnormalText: string): void {
  if (to.readyState === WebSocket.CONNECTING) { to.terminate(); return }
  if (to.readyState !== WebSocket.OPEN) return
  if (sendable(code)) to.close(code, reason)
  else if (code === 1005) to.close()
  else to.close(abnormal, abnormalText)
}

export class WsSession {
  private endedBy: WsCloseReason | undefined = undefined
  private lastMessageAt = Date.now()
  private awaitingPong = false
  /** Client messages waiting for their verdict, and their bytes. */
  private waiting = 0
  private waitingBytes = 0

  constructor (
    readonly client: WebSocket,
    readonly target: WebSocket,
    readonly request: FastifyRequest,
    readonly identity: Identity,
    private readonly slot: Slot,
    private readonly hooks: SessionHooks
  ) {}

  /** Why the session ended (the first reason); undefined while it is live. */
  get ended (): WsCloseReason | undefined { return this.endedBy }

  /** When the last message went either way (Date.now() ms); the session's start before any. */
  get lastActivity (): number { return this.lastMessageAt }

  /** The session is live and the app side is open. */
  get accepting (): boolean { return this.endedBy === undefined && this.target.readyState === WebSocket.OPEN }

  /**
   * Starts the bridge: what the app sent early goes first, then both
   * directions flow, client messages through `gate` when there is one (none:
   * no message limit). The app side was paused until now.
   */
  start (early: readonly EarlyMessage[], gate: MessageGate | undefined): void {
    const { client, target, hooks: { metrics } } = this
    for (const m of early) {
      metrics.wsMessages.app_to_client.inc()
      client.send(m.data, { binary: m.binary })
    }
    if (gate === undefined) this.forward(client, target, 'client_to_app')
    else client.on('message', (raw, isBinary) => { this.fromClient(gate, raw as Buffer, isBinary) })
    this.forward(target, client, 'app_to_client')
    this.relayCloses()
    target.resume()
  }

  /** Marks the session over (first reason wins) and frees what it held. */
  end (reason: WsCloseReason): void {
    if (this.endedBy !== undefined) return
    this.endedBy = reason
    this.hooks.onEnd(this)
    this.slot.release()
    this.hooks.metrics.wsConnections.dec()
    this.hooks.metrics.wsCloses.labels(reason).inc()
  }

  /** The gateway ends the session: the client gets `code`, the app a normal close. */
  terminate (reason: WsCloseReason, code: number, text: string): void {
    this.end(reason)
    if (this.client.readyState === WebSocket.OPEN) this.client.close(code, text)
    else this.client.terminate()
    if (this.target.readyState === WebSocket.OPEN) this.target.close(CLOSE.goingAway, text)
    else this.target.terminate()
  }

  /** Sends the client a text message when its side is open. */
  notify (text: string): void {
    if (this.client.readyState === WebSocket.OPEN) this.client.send(text)
  }

  /** One liveness round: a client that did not answer the last ping is gone. */
  ping (): void {
    // A client we paused (backpressure) cannot have its pong read: not a dead client.
    if (this.client.isPaused) { this.awaitingPong = false; return }
    if (this.awaitingPong) { this.terminate('ping_timeout', CLOSE.goingAway, 'ping timeout'); return }
    this.awaitingPong = true
    this.client.ping()
  }

  /** A client message with a gate: counted as waiting until its verdict, then forwarded, refused or let go. */
  private fromClient (gate: MessageGate, data: Buffer, isBinary: boolean): void {
    const { client, target } = this
    const size = data.length
    this.lastMessageAt = Date.now()
    this.waiting++
    this.waitingBytes += size
    if ((this.waiting >= MAX_PENDING_MESSAGES || this.waitingBytes + target.bufferedAmount > this.hooks.maxBuffered) && !client.isPaused) client.pause()
    gate.submit((outcome: MessageOutcome) => {
      this.waiting--
      this.waitingBytes -= size
      if (outcome === 'gone') return
      if (outcome === 'refused') { this.resumeClient(); return }
      this.hooks.metrics.wsMessages.client_to_app.inc()
      target.send(data, { binary: isBinary }, this.resumeClient)
      if (target.bufferedAmount > this.hooks.maxBuffered && !client.isPaused) client.pause()
      else this.resumeClient()
    })
  }

  /** Resumes a paused client once both its waiting messages and the app side's buffer are below half their bounds. */
  private readonly resumeClient = (): void => {
    const max = this.hooks.maxBuffered
    if (this.client.isPaused && this.waiting < MAX_PENDING_MESSAGES / 2 && this.waitingBytes + this.target.bufferedAmount < max / 2) this.client.resume()
  }

  /** src -> dst with backpressure: src pauses while dst has too much queued. */
  private forward (src: WebSocket, dst: WebSocket, direction: WsDirection): void {
    const counter = this.hooks.metrics.wsMessages[direction]
    const max = this.hooks.maxBuffered
    const drained = (): void => {
      if (src.isPaused && dst.bufferedAmount < max / 2) src.resume()
    }
    src.on('message', (data, isBinary) => {
      this.lastMessageAt = Date.now()
      if (dst.readyState !== WebSocket.OPEN) return
      counter.inc()
      dst.send(data as Buffer, { binary: isBinary }, drained)
      if (dst.bufferedAmount > max && !src.isPaused) src.pause()
    })
  }

  /** Each side's close and error reach the other side. */
  private relayCloses (): void {
    const { client, target, request, hooks: { metrics } } = this
    client.on('pong', () => { this.awaitingPong = false })
    client.on('close', (code, reason) => {
      this.end('client_closed')
      relayClose(target, code, reason, CLOSE.goingAway, 'client went away')
    })
    target.on('close', (code, reason) => {
      this.end('upstream_closed')
      relayClose(client, code, reason, CLOSE.badGateway, 'upstream closed abnormally')
    })
    target.on('error', (err) => {
      request.log.debug({ err: { message: err.message } }, 'upstream websocket error')
      if (this.endedBy === undefined) metrics.upstreamErrors.labels('reset', 'ws').inc()
      this.end('upstream_error')
      if (client.readyState === WebSocket.OPEN) client.close(CLOSE.badGateway, 'upstream error')
    })
    client.on('error', (err: Error & { code?: string }) => {
      this.end(err.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH' ? 'message_too_big' : 'client_error')
      if (target.readyState === WebSocket.OPEN) target.close(CLOSE.goingAway, 'client error')
      else target.terminate()
    })
  }
}
