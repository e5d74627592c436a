/**
 * The limits of one WebSocket, on top of the counting in ./ws.ts:
 *  - admission: a connection slot per upgrade (429 when the user has
 *    WS_MAX_CONNECTIONS_PER_USER open, 503 when the slot store refuses);
 *  - the message gate: each client message waits for its verdict, in arrival
 *    order, so allowed messages reach the app in order and one over the limit
 *    never does. Over the limit, WS_MESSAGE_LIMIT_ACTION applies: `close`
 *    ends the session with 1008, `drop` keeps it and tells the client; a
 *    store that refuses (RATE_LIMIT_ON_STORE_ERROR=closed) ends it with 1013.
 * Exempt callers (rateLimit.exempt) take no slot and pass no gate.
 */
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { LiveConfig } from '../config/live.js'
import type { Identity } from '../auth/identity.js'
import type { Audit, Requester } from '../observability/audit.js'
import type { WsCloseReason } from '../observability/metrics.js'
import { CLOSE } from '../http/ws-close.js'
import { CONNECTION_LIMITS_UNAVAILABLE, droppedMessageNotice, send, tooManyWebSocketsAnswer } from '../http/answers.js'
import { isExempt } from './http.js'
import type { ConnectionSlots, MessageVerdict, WsMessageLimiter } from './ws.js'

/** One WebSocket's hold on the per-user connection cap; an exempt caller's holds none. */
export class Slot {
  constructor (private readonly slots: ConnectionSlots | undefined, readonly sub: string, readonly id: string) {}

  get exempt (): boolean { return this.slots === undefined }

  /** Gives the slot back (idempotent). */
  release (): void { this.slots?.release(this.sub, this.id) }
}

/** What the message gate needs of a session. */
export interface GatedSession {
  readonly identity: Identity
  readonly request: Requester
  /** Why the session ended; undefined while it is live. */
  readonly ended: WsCloseReason | undefined
  /** The session is live and the app side is open. */
  readonly accepting: boolean
  /** Ends the session: the client gets `code`, the app a normal close. */
  terminate (reason: WsCloseReason, code: number, text: string): void
  /** Sends the client a text message when its side is open. */
  notify (text: string): void
}

/** What became of one client message: forward it, it was refused (policy applied), or there is nothing to do. */
export type MessageOutcome = 'allowed' | 'refused' | 'gone'

export interface WsLimitsOptions {
  /** Exemptions and the message-limit action are read per use (reloadable). */
  live: LiveConfig
  slots: ConnectionSlots
  messages: WsMessageLimiter
  audit: Audit
}

export class WsLimits {
  constructor (private readonly opts: WsLimitsOptions) {}

  /** A connection slot for an upgrade of `identity`, or undefined after answering 429 or 503. */
  async admit (request: FastifyRequest, reply: FastifyReply, identity: Identity): Promise<Slot | undefined> {
    const { live, slots, audit } = this.opts
    if (isExempt(identity, live.current.rateLimit)) return new Slot(undefined, identity.sub, '')
    const slot = await slots.acquire(identity.sub)
    if (slot.result === 'ok') return new Slot(slots, identity.sub, slot.id)
    if (slot.result === 'full') {
      audit.denied(request, { event: 'rate_limited', reason: 'ws_connections', transport: 'ws', status: 429, sub: identity.sub })
      send(reply, tooManyWebSocketsAnswer(live.current.ws.maxConnectionsPerUser), 5)
      return undefined
    }
    send(reply, CONNECTION_LIMITS_UNAVAILABLE, 1)
    return undefined
  }

  /** The message gate of a session holding `slot`; undefined for an exempt caller (no message limit). */
  gate (session: GatedSession, slot: Slot): MessageGate | undefined {
    return slot.exempt ? undefined : new MessageGate(session, this.opts)
  }
}

/**
 * Verdicts delivered in arrival order. With nothing waiting and a check that
 * answers inside its own call (the in-process store), the verdict is handed
 * over within the caller's event; otherwise the checks run one after another
 * on a promise chain, each starting once the previous one answered.
 */
export class OrderedVerdicts {
  private chain: Promise<void> = Promise.resolve()
  /** Submitted and not yet handed over. */
  private waiting = 0

  constructor (private readonly check: (cb: (verdict: MessageVerdict | undefined) => void) => void) {}

  /** Hands `settle` this message's verdict once every earlier verdict was handed over. */
  submit (settle: (verdict: MessageVerdict | undefined) => void): void {
    const deliver = (verdict: MessageVerdict | undefined): void => { this.waiting--; settle(verdict) }
    if (this.waiting++ > 0) {
      this.chain = this.chain.then(() => new Promise<void>((resolve) => {
        this.check((verdict) => { resolve(); deliver(verdict) })
      }))
      return
    }
    let sync = true
    let answered = false
    let answer: MessageVerdict | undefined
    let release: (() => void) | undefined
    this.check((verdict) => {
      if (sync) { answered = true; answer = verdict; return }
      release?.() // the next check starts after this (a microtask): order is kept
      deliver(verdict)
    })
    sync = false
    if (answered) deliver(answer)
    else this.chain = new Promise((resolve) => { release = resolve }) // later messages wait for this one
  }
}

/** The per-session message limit: verdicts in order, then the close/drop policy and its audit line. */
export class MessageGate {
  private readonly verdicts: OrderedVerdicts

  constructor (private readonly session: GatedSession, private readonly opts: WsLimitsOptions) {
    const sub = session.identity.sub
    this.verdicts = new OrderedVerdicts((cb) => { opts.messages.check(sub, (_err, verdict) => { cb(verdict) }) })
  }

  /** Decides one client message; `then` gets its outcome after those of earlier messages. */
  submit (then: (outcome: MessageOutcome) => void): void {
    this.verdicts.submit((verdict) => { then(this.decide(verdict)) })
  }

  private decide (verdict: MessageVerdict | undefined): MessageOutcome {
    const s = this.session
    if (verdict === undefined) {
      // Store refused (RATE_LIMIT_ON_STORE_ERROR=closed): cannot vouch for the message.
      if (s.ended === undefined) s.terminate('rate_limited', CLOSE.tryAgainLater, 'rate limiting unavailable')
      return 'gone'
    }
    if (!s.accepting) return 'gone'
    if (verdict.allowed) return 'allowed'
    this.overLimit(verdict.retryAfterSec)
    return 'refused'
  }

  /**
   * A client message over the limit: one audit line and one
   * resonance_rate_limit_triggered_total{transport="ws"} per message refused.
   * `close` ends the connection (status 1008); `drop` keeps it, so its line
   * has status 429, the status the client's notice stands for.
   */
  private overLimit (retryAfterSec: number): void {
    const { session: s, opts: { live, audit } } = this
    if (live.current.ws.messageLimit.action === 'close') {
      audit.denied(s.request, { event: 'rate_limited', reason: 'ws_message_limit', transport: 'ws', status: CLOSE.policy, action: 'close', sub: s.identity.sub })
      s.terminate('rate_limited', CLOSE.policy, 'message rate limit exceeded')
      return
    }
    audit.denied(s.request, { event: 'rate_limited', reason: 'ws_message_limit', transport: 'ws', status: 429, action: 'drop', sub: s.identity.sub })
    s.notify(droppedMessageNotice(retryAfterSec))
  }
}
