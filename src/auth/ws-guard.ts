/**
 * Authentication for WebSockets beyond the upgrade request itself:
 *  - an upgrade needs a verified caller, on public paths too (WebSocket
 *    limits are per user);
 *  - a live session is closed with 1008 when its token expires (exp plus the
 *    clock tolerance) or is revoked, with one audit line each.
 * Live sessions are kept by `sub`, so a revocation of a sub finds its
 * sessions without a scan.
 */
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Audit, Requester } from '../observability/audit.js'
import type { WsCloseReason } from '../observability/metrics.js'
import { CLOSE } from '../http/ws-close.js'
import { authAnswer, send } from '../http/answers.js'
import type { Identity } from './identity.js'
import type { Revocation, Revocations } from './revocation.js'

/** Longest delay a Node timer takes; longer expiries re-arm. */
const MAX_TIMER_MS = 2_147_483_647

/** What the guard needs of a live WebSocket session. */
export interface GuardedSession {
  readonly identity: Identity
  readonly request: Requester
  /** Ends the session: the client gets `code`, the app a normal close. */
  terminate (reason: WsCloseReason, code: number, text: string): void
}

export class WsGuard<S extends GuardedSession> {
  private readonly live = new Set<S>()
  private readonly bySub = new Map<string, Set<S>>()
  private readonly expiry = new Map<S, NodeJS.Timeout>()

  constructor (
    private readonly revocations: Revocations,
    private readonly audit: Audit,
    private readonly toleranceMs: number
  ) {
    revocations.onRevoked((r) => { this.revoked(r) })
  }

  /** The live sessions, in the order they started. */
  get sessions (): ReadonlySet<S> { return this.live }

  /**
   * The verified caller of an upgrade, or null after answering the RFC 6750
   * challenge (a public path: no identity to hold limits against).
   */
  caller (request: FastifyRequest, reply: FastifyReply): Identity | null {
    if (request.identity !== null) return request.identity
    const c = authAnswer('missing_token')
    this.audit.denied(request, { event: 'auth_failure', reason: 'missing_token', transport: 'ws', status: c.status })
    send(reply, c)
    return null
  }

  /** Guards a new session; false when its token is already revoked (the session is closed). */
  watch (s: S): boolean {
    this.live.add(s)
    let forSub = this.bySub.get(s.identity.sub)
    if (forSub === undefined) { forSub = new Set(); this.bySub.set(s.identity.sub, forSub) }
    forSub.add(s)
    this.armExpiry(s)
    if (!this.revocations.isRevoked(s.identity)) return true
    this.close(s, 'revoked')
    return false
  }

  /** Stops guarding an ended session. */
  forget (s: S): void {
    clearTimeout(this.expiry.get(s))
    this.expiry.delete(s)
    this.live.delete(s)
    const forSub = this.bySub.get(s.identity.sub)
    forSub?.delete(s)
    if (forSub?.size === 0) this.bySub.delete(s.identity.sub)
  }

  private armExpiry (s: S): void {
    const dueAt = s.identity.exp * 1000 + this.toleranceMs
    this.expiry.set(s, setTimeout(() => {
      if (dueAt > Date.now()) return this.armExpiry(s) // clamped timer: not due yet
      this.close(s, 'expired')
    }, Math.min(Math.max(dueAt - Date.now(), 0), MAX_TIMER_MS)))
  }

  private revoked (r: Revocation): void {
    const hit = (s: S): boolean => r.kind === 'jti'
      ? s.identity.jti === r.value
      : r.kind === 'sid'
        ? s.identity.sid === r.value
        : s.identity.iat === undefined || s.identity.iat <= r.at
    const candidates = r.kind === 'sub' ? [...(this.bySub.get(r.value) ?? [])] : [...this.live]
    for (const s of candidates) {
      if (hit(s)) this.close(s, r.cause === 'logout' ? 'session_ended' : 'revoked')
    }
  }

  private close (s: S, why: 'revoked' | 'session_ended' | 'expired'): void {
    const reason = why === 'expired' ? 'expired' : 'revoked'
    this.audit.denied(s.request, { event: 'auth_failure', reason, transport: 'ws', status: CLOSE.policy, sub: s.identity.sub })
    if (why === 'revoked') s.terminate('revoked', CLOSE.policy, 'token revoked')
    else if (why === 'session_ended') s.terminate('session_ended', CLOSE.policy, 'session ended')
    else s.terminate('token_expired', CLOSE.policy, 'token expired')
  }
}
