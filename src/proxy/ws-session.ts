/**
 * One proxied WebSocket session after the 101: the client's TCP socket and
 * the app's, joined by a byte relay. Bytes go through unchanged both ways;
 * only frame headers are read (./ws-frames.ts):
 *  - client -> app: every header is checked as `ws` checks it (a violation
 *    closes with ws's code: 1002, 1007 or 1009); each data message passes the
 *    session's message gate before its bytes go on (in order; a refused one
 *    is skipped whole in drop mode, control frames inside it still pass);
 *  - app -> client: frame and message boundaries, where the gateway's own
 *    frames go in (pings, the drop notice, its close frames), the app's close
 *    frame, messages over WS_MAX_PAYLOAD.
 * Backpressure: a side is paused while the other has more than WS_MAX_BUFFERED
 * queued (client messages waiting for their verdict count too). Closes: a
 * close frame passes through and the close handshake completes end to end;
 * a side that ends without one gets the gateway's close frame on the other
 * side (1001 towards the app, 1014 towards the client), as before.
 */
import type { Socket } from 'node:net'
import type { FastifyBaseLogger } from 'fastify'
import type { Identity } from '../auth/identity.js'
import type { Metrics, WsCloseReason } from '../observability/metrics.js'
import type { Requester } from '../observability/audit.js'
import { CLOSE } from '../http/ws-close.js'
import type { MessageGate, MessageOutcome, Slot } from '../limits/ws-gate.js'
import { AppFrameScanner, ClientFrameReader, closeFrame, frame, OPCODE, PING_FRAME, UNTIL, VIOLATION, type ClientFrameSink, type Until } from './ws-frames.js'

/** Client messages waiting for their limit check before the client is paused. */
export const MAX_PENDING_MESSAGES = 256
/** After a session ended, how long its sockets may take to finish the close handshake before they are destroyed. */
export const CLOSE_TIMEOUT_MS = 10_000

export interface SessionHooks {
  metrics: Metrics
  /** Diagnostic logger (lines carry the upgrade's reqId). */
  log: FastifyBaseLogger
  /** Bytes queued towards one side before the other side is paused. */
  maxBuffered: number
  /** Largest message (bytes, all fragments) either side may send. */
  maxPayload: number
  /** Called once, when the session ends (first reason). */
  onEnd (s: WsSession): void
}

/** A client message's verdict: its bytes wait, go on, or are skipped. */
const enum Verdict { Pending, Allowed, Skipped }
interface Mark { verdict: Verdict }
/** The mark of every message of a caller without a message limit. */
const ALWAYS: Mark = { verdict: Verdict.Allowed }

/** The mark of the client's close frame: the session ends once it went to the app, after any message held before it. */
const CLIENT_CLOSE: Mark = { verdict: Verdict.Allowed }

/** Client bytes held behind a message still waiting for its verdict. */
interface Held { bytes: Buffer, mark: Mark | null }

/** A gateway frame waiting for a boundary of the app's stream to the client. */
interface Insert { bytes: Buffer, until: Until, last: boolean }

export class WsSession implements ClientFrameSink<Mark> {
  private endedBy: WsCloseReason | undefined = undefined
  private lastMessageAt = Date.now()
  private awaitingPong = false
  private gate: MessageGate | undefined = undefined

  // client -> app
  private readonly reader: ClientFrameReader<Mark>
  private readonly held: Held[] = []
  private heldBytes = 0
  /** Messages waiting for their verdict. */
  private pending = 0
  /** Allowed bytes of the chunk being read, written in one go at its end. */
  private run: Buffer | undefined = undefined
  private runStart = 0
  private runEnd = 0
  /** Nothing more is written to the app (the gateway closed that side). */
  private appDone = false
  /** The client's close frame went to the app; the client ended its stream (FIN). */
  private clientCloseDone = false
  private clientFin = false

  // app -> client
  private readonly scanner: AppFrameScanner
  private inserts: Insert[] | undefined = undefined
  /** Nothing more is written to the client (a close frame went to it, or it ended). */
  private clientDone = false
  private closeTimer: NodeJS.Timeout | undefined = undefined

  constructor (
    readonly client: Socket,
    readonly app: Socket,
    readonly request: Requester,
    readonly identity: Identity,
    private readonly slot: Slot,
    private readonly hooks: SessionHooks
  ) {
    this.reader = new ClientFrameReader(hooks.maxPayload, this)
    this.scanner = new AppFrameScanner(hooks.maxPayload)
    const c = client as Owned
    const a = app as Owned
    c[SESSION] = this
    a[SESSION] = this
    client.on('error', onClientError)
    app.on('error', onAppError)
  }

  /** Why the session ended (the first reason); undefined while it is live. */
  get ended (): WsCloseReason | undefined { return this.endedBy }

  /** When the last data message went either way (Date.now() ms); the session's start before any. */
  get lastActivity (): number { return this.lastMessageAt }

  /** The session is live and the app side is open. */
  get accepting (): boolean { return this.endedBy === undefined && !this.appDone }

  /**
   * Starts relaying. `clientHead` and `appHead` are bytes each side sent
   * right behind its handshake; client messages pass `gate` when there is one
   * (none: no message limit).
   */
  start (clientHead: Buffer, appHead: Buffer, gate: MessageGate | undefined): void {
    const { client, app } = this
    this.gate = gate
    client.setNoDelay(true)
    app.setNoDelay(true)
    client.on('data', onClientData)
    app.on('data', onAppData)
    client.on('drain', onClientDrain)
    app.on('drain', onAppDrain)
    client.on('end', onClientEnd)
    app.on('end', onAppEnd)
    client.on('close', onClientClose)
    app.on('close', onAppEnd)
    if (appHead.length > 0) this.fromApp(appHead)
    if (clientHead.length > 0) this.fromClient(clientHead)
  }

  /** Marks the session over (first reason wins) and frees what it held. */
  end (reason: WsCloseReason): void {
    if (this.endedBy !== undefined) return
    this.endedBy = reason
    this.hooks.onEnd(this)
    this.slot.release()
    this.hooks.metrics.wsConnections.dec()
    this.hooks.metrics.wsCloses.labels(reason).inc()
    this.armCloseTimer()
  }

  /** Both sockets are destroyed if they have not closed within CLOSE_TIMEOUT_MS. */
  private armCloseTimer (): void {
    if (this.closeTimer !== undefined) return
    this.closeTimer = setTimeout(() => {
      this.client.destroy()
      this.app.destroy()
    }, CLOSE_TIMEOUT_MS)
    this.closeTimer.unref()
  }

  /** The gateway ends the session: the client gets `code`, the app 1001. */
  terminate (reason: WsCloseReason, code: number, text: string): void {
    this.end(reason)
    this.closeClient(code, text)
    this.closeApp(CLOSE.goingAway, text)
  }

  /** Sends the client a text message (between the app's messages) while its side is open. */
  notify (text: string): void {
    this.insert(frame(OPCODE.text, Buffer.from(text), false), UNTIL.message, false)
  }

  /** One liveness round: a client that did not answer the last ping is gone. */
  ping (): void {
    // A client we paused (backpressure) cannot have its pong read, and a ping
    // still waiting for the app's frame to end was not sent: neither is a dead client.
    if (this.client.isPaused() || this.inserts !== undefined) { this.awaitingPong = false; return }
    if (this.awaitingPong) { this.terminate('ping_timeout', CLOSE.goingAway, 'ping timeout'); return }
    this.awaitingPong = true
    this.insert(PING_FRAME, UNTIL.frame, false)
  }

  // --- client -> app ------------------------------------------------------------------------------------------------

  /** Client bytes: read frame by frame, passed on as their messages' verdicts allow. */
  fromClient (chunk: Buffer): void {
    this.reader.feed(chunk)
    this.flushRun()
    const { client, app, hooks: { maxBuffered } } = this
    if (!client.isPaused() && (this.pending >= MAX_PENDING_MESSAGES || this.heldBytes + app.writableLength > maxBuffered)) client.pause()
  }

  messageStart (): Mark {
    this.lastMessageAt = Date.now()
    const gate = this.gate
    if (gate === undefined) {
      this.hooks.metrics.wsMessages.client_to_app.inc()
      return ALWAYS
    }
    const mark: Mark = { verdict: Verdict.Pending }
    this.pending++
    gate.submit((outcome: MessageOutcome) => { this.decided(mark, outcome) })
    return mark
  }

  private decided (mark: Mark, outcome: MessageOutcome): void {
    this.pending--
    if (outcome === 'allowed') {
      mark.verdict = Verdict.Allowed
      this.hooks.metrics.wsMessages.client_to_app.inc()
    } else {
      mark.verdict = Verdict.Skipped
    }
    this.release()
  }

  bytes (chunk: Buffer, from: number, to: number, mark: Mark | null): void {
    if (this.appDone) return
    if (this.held.length === 0) {
      if (mark === null || mark.verdict === Verdict.Allowed) {
        if (this.run === chunk && this.runEnd === from) { this.runEnd = to; return }
        this.flushRun()
        this.run = chunk
        this.runStart = from
        this.runEnd = to
        return
      }
      if (mark.verdict === Verdict.Skipped) return
    }
    this.flushRun()
    this.held.push({ bytes: chunk.subarray(from, to), mark })
    this.heldBytes += to - from
  }

  private flushRun (): void {
    const run = this.run
    if (run === undefined) return
    this.run = undefined
    this.app.write(this.runStart === 0 && this.runEnd === run.length ? run : run.subarray(this.runStart, this.runEnd))
  }

  /** Sends held bytes on, in order, up to the first message still waiting for its verdict. */
  private release (): void {
    const held = this.held
    while (held.length > 0) {
      const h = held[0] as Held
      if (h.mark !== null && h.mark.verdict === Verdict.Pending) break
      held.shift()
      this.heldBytes -= h.bytes.length
      if (!this.appDone && (h.mark === null || h.mark.verdict === Verdict.Allowed)) this.app.write(h.bytes)
      if (h.mark === CLIENT_CLOSE) this.clientCloseSent()
    }
    this.endAppStream()
    this.resumeClient()
  }

  /** Resumes a paused client once its waiting messages and the app side's queue are below half their bounds. */
  resumeClient (): void {
    const max = this.hooks.maxBuffered
    if (this.client.isPaused() && this.pending < MAX_PENDING_MESSAGES / 2 && this.heldBytes + this.app.writableLength < max / 2) this.client.resume()
  }

  pong (): void { this.awaitingPong = false }

  /** The client's close frame goes to the app (after what is held); the app answers through the relay. */
  closed (bytes: Buffer): void {
    this.bytes(bytes, 0, bytes.length, CLIENT_CLOSE)
    this.flushRun()
    if (this.held.length === 0) this.clientCloseSent()
  }

  /** The client's close frame went to the app: the session has ended, and closeApp() writes no second close frame. */
  private clientCloseSent (): void {
    this.end('client_closed')
    this.clientCloseDone = true
  }

  /** A protocol violation: ws's close code to the client, 1001 to the app. */
  violation (code: number): void {
    this.flushRun()
    this.end(code === VIOLATION.tooBig ? 'message_too_big' : 'client_error')
    this.closeClient(code, '')
    this.closeApp(CLOSE.goingAway, 'client error')
  }

  /** Closes the app side: a close frame when the bytes written so far end a frame, then the end of the stream. */
  private closeApp (code: number, text: string): void {
    if (this.appDone) return
    this.appDone = true
    this.reader.stop()
    this.held.length = 0
    this.heldBytes = 0
    const mark = this.reader.current
    const midFrame = this.reader.inPassedFrame && (mark === null || mark.verdict === Verdict.Allowed)
    // (after the client's own close frame went to the app, a second one would break the protocol)
    if (!midFrame && !this.clientCloseDone && this.app.writable) this.app.write(closeFrame(code, text, true))
    if (!this.app.destroyed) this.app.end()
  }

  // --- app -> client ------------------------------------------------------------------------------------------------

  /** App bytes: passed on whole, split only where a gateway frame goes in or the app's stream ends. */
  fromApp (chunk: Buffer): void {
    const scanner = this.scanner
    const frames = scanner.dataFrames
    const messages = scanner.messages
    let from = 0
    while (from < chunk.length && !this.clientDone) {
      const to = scanner.scan(chunk, from, this.inserts?.[0]?.until ?? UNTIL.none)
      if (to > from) this.client.write(from === 0 && to === chunk.length ? chunk : chunk.subarray(from, to))
      from = to
      if (scanner.stop === 'boundary') this.insertWaiting()
      else if (scanner.stop === 'close') this.appClosing()
      else if (scanner.stop === 'too_big') this.appTooBig()
    }
    if (scanner.dataFrames !== frames) this.lastMessageAt = Date.now()
    if (scanner.messages !== messages) this.hooks.metrics.wsMessages.app_to_client.inc(scanner.messages - messages)
    if (this.client.writableLength > this.hooks.maxBuffered && !this.app.isPaused()) this.app.pause()
  }

  resumeApp (): void {
    if (this.app.isPaused() && this.client.writableLength < this.hooks.maxBuffered / 2) this.app.resume()
  }

  /** The app's close frame went to the client: nothing of the app's follows it; the client's answer goes back. */
  private appClosing (): void {
    this.clientDone = true
    this.end('upstream_closed')
  }

  /** A message from the app over WS_MAX_PAYLOAD: 1009 to the app, 1014 to the client (as the ws client in the gateway did). */
  private appTooBig (): void {
    this.hooks.log.debug({ reqId: this.request.id }, 'upstream websocket message over WS_MAX_PAYLOAD')
    if (this.endedBy === undefined) this.hooks.metrics.upstreamErrors.labels('reset', 'ws').inc()
    this.end('upstream_error')
    this.closeApp(VIOLATION.tooBig, '')
    this.closeClient(CLOSE.badGateway, 'upstream error')
  }

  /** A gateway frame for the client, written at the next frame (or message) boundary of the app's stream. */
  private insert (bytes: Buffer, until: Until, last: boolean): void {
    if (this.clientDone) return
    const s = this.scanner
    if (this.inserts === undefined && (until === UNTIL.frame ? s.atFrameBoundary : s.atMessageBoundary)) {
      this.writeInsert(bytes, last)
      return
    }
    (this.inserts ??= []).push({ bytes, until, last })
  }

  /** At a boundary of the app's stream: writes the waiting frames it allows, in order. */
  private insertWaiting (): void {
    const inserts = this.inserts
    if (inserts === undefined) return
    while (inserts.length > 0 && !this.clientDone) {
      const next = inserts[0] as Insert
      if (next.until === UNTIL.message && !this.scanner.atMessageBoundary) return
      inserts.shift()
      this.writeInsert(next.bytes, next.last)
    }
    this.inserts = undefined
  }

  private writeInsert (bytes: Buffer, last: boolean): void {
    if (this.client.writable) this.client.write(bytes)
    if (!last) return
    this.clientDone = true
    this.client.end()
  }

  /** Closes the client side with `code` at the next frame boundary of the app's stream (now, when the stream is at one). */
  private closeClient (code: number, text: string): void {
    if (this.clientDone) return
    this.insert(closeFrame(code, text, false), UNTIL.frame, true)
  }

  // --- socket events -------------------------------------------------------------------------------------------------

  /**
   * The client ended its stream (FIN; it may still read): the app's stream
   * ends too, after what is still held, and the app's answer still reaches
   * the client (a ws app answers a bad message it read with its close frame,
   * or just ends), as between the two directly.
   */
  clientEnded (): void {
    this.clientFin = true
    this.armCloseTimer()
    this.endAppStream()
  }

  /** After the client's FIN: the app's stream ends once nothing is held for it. */
  private endAppStream (): void {
    if (this.clientFin && this.held.length === 0 && !this.appDone && !this.app.destroyed) this.app.end()
  }

  /** The client's connection closed: 1001 to the app. */
  clientGone (): void {
    this.end('client_closed')
    this.closeApp(CLOSE.goingAway, 'client went away')
    this.clientDone = true
    if (!this.client.destroyed) this.client.end()
    this.settled()
  }

  /** The app's stream ended: after its close frame that is the close handshake's end; without one, 1014 to the client. */
  appEnded (): void {
    // after the client's own FIN this is the app's answer to it, not an abnormal end
    this.end(this.clientFin ? 'client_closed' : 'upstream_closed')
    this.appDone = true
    this.reader.stop()
    this.finishClient(this.clientFin ? undefined : 'upstream closed abnormally')
    this.settled()
  }

  /**
   * The app side is gone: the client's stream ends, after a 1014 close frame
   * when the app sent none and the stream is between frames.
   */
  private finishClient (text: string | undefined): void {
    if (text !== undefined && !this.clientDone && this.scanner.atFrameBoundary && this.client.writable) this.client.write(closeFrame(CLOSE.badGateway, text, false))
    this.clientDone = true
    this.inserts = undefined
    if (!this.client.destroyed) this.client.end()
  }

  clientFailed (err: Error): void {
    this.hooks.log.debug({ reqId: this.request.id, err: { message: err.message } }, 'client websocket error')
    this.end('client_error')
    this.closeApp(CLOSE.goingAway, 'client error')
    this.client.destroy()
  }

  appFailed (err: Error): void {
    this.hooks.log.debug({ reqId: this.request.id, err: { message: err.message } }, 'upstream websocket error')
    if (this.endedBy === undefined) this.hooks.metrics.upstreamErrors.labels('reset', 'ws').inc()
    this.end('upstream_error')
    this.appDone = true
    this.reader.stop()
    this.finishClient('upstream error')
    this.app.destroy()
  }

  /** Both sockets closed: the close timer is not needed. */
  private settled (): void {
    if (this.client.destroyed && this.app.destroyed) clearTimeout(this.closeTimer)
  }
}

// Socket listeners shared by all sessions, each socket pointing at its
// session (as `ws` does): eight closures per session would cost ~0.5 KiB.
const SESSION = Symbol('ws session')
type Owned = Socket & { [SESSION]: WsSession }
function onClientData (this: Owned, chunk: Buffer): void { this[SESSION].fromClient(chunk) }
function onAppData (this: Owned, chunk: Buffer): void { this[SESSION].fromApp(chunk) }
function onClientDrain (this: Owned): void { this[SESSION].resumeApp() }
function onAppDrain (this: Owned): void { this[SESSION].resumeClient() }
function onClientEnd (this: Owned): void { this[SESSION].clientEnded() }
function onClientClose (this: Owned): void { this[SESSION].clientGone() }
function onAppEnd (this: Owned): void { this[SESSION].appEnded() }
function onClientError (this: Owned, err: Error): void { this[SESSION].clientFailed(err) }
function onAppError (this: Owned, err: Error): void { this[SESSION].appFailed(err) }
