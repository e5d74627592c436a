/**
 * OpenID Connect Back-Channel Logout 1.0: when a session ends at the issuer
 * (the user logs out, an administrator signs the user out), the issuer POSTs
 * `logout_token=<JWT>` (application/x-www-form-urlencoded) to
 * BACKCHANNEL_LOGOUT_PATH. The token is validated as the specification's
 * section 2.6 says, then
 *  - with `sid`: every token of that login session is revoked (Keycloak
 *    puts its user-session id in the `sid` of its access tokens);
 *  - with `sub` only: every token of that user issued up to the logout
 *    token's `iat`.
 * The revocation is the admin API's (revocation.ts): stored in Redis,
 * announced to every replica, live WebSockets of the session closed with
 * 1008 "session ended". Answers (section 2.8): 200, or 400 with an error
 * document; both `Cache-Control: no-store`. One audit line per request.
 *
 * Signature, algorithm and key: the same KeyStore, kid rules and algorithm
 * allowlist as access tokens, verified by fast-jwt (the engine @fastify/jwt
 * runs for access tokens). A logout token's `jti` is accepted once: it is
 * remembered until the token expires (in Redis, so a token replayed to
 * another replica is refused too). Tokens that fail count towards the
 * per-IP limit on failed tokens, as failed access tokens do.
 */
import { createHash } from 'node:crypto'
import { createVerifier } from 'fast-jwt'
import type { Cluster, Redis } from 'ioredis'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { Audit } from '../observability/audit.js'
import type { LogoutResult } from '../observability/metrics.js'
import { KEY_ERRORS, KeyError } from '../errors.js'
import { logoutAnswer, LOGOUT_DONE, send, TOO_MANY_FAILURES } from '../http/answers.js'
import { OWN_ROUTE } from '../http/own-route.js'
import type { KeyStore } from './keys.js'
import type { FailedTokenLimit } from './plugin.js'
import type { Revocations } from './revocation.js'
import { tokenHeader } from './token.js'

export const LOGOUT_EVENT = 'http://schemas.openid.net/event/backchannel-logout'
/** Header `typ` values of a logout token: the specification's, and `JWT` (Keycloak before 25). Absent is fine too. */
const LOGOUT_TYP = new Set(['logout+jwt', 'application/logout+jwt', 'jwt'])
/** A logout token without `exp` (Keycloak before 22) is accepted this long after its `iat`. */
export const MAX_LOGOUT_TOKEN_AGE_S = 600
/** The form body: one token and little else. */
const BODY_LIMIT = 16 * 1024
/** `jti`s remembered without Redis; beyond it the oldest are forgotten. */
const MAX_LOCAL_JTIS = 100_000

export interface LogoutOptions {
  config: Config
  keys: KeyStore
  revocations: Revocations
  audit: Audit
  failures: FailedTokenLimit
  redis: Redis | Cluster | undefined
}

type Claims = Record<string, unknown>
type Refusal = Exclude<LogoutResult, 'accepted'>
interface LogoutClaims { sub: string | undefined, sid: string | undefined, iat: number, jti: string, deadAt: number }
/** Why a logout token was refused, with its sub and sid once its signature verified (for the audit line). */
interface Refused { result: Refusal, sub?: string | undefined, sid?: string | undefined }

/** Registers POST <path> on `app` (the public or the admin listener), with its own form parser. */
export async function registerBackchannelLogout (app: FastifyInstance, path: string, opts: LogoutOptions): Promise<void> {
  const receiver = new LogoutReceiver(opts)
  await app.register(async (scope) => {
    // Only this route parses forms: proxied bodies stream through untouched.
    scope.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string', bodyLimit: BODY_LIMIT }, (_req, body, done) => {
      done(null, new URLSearchParams(body as string))
    })
    // A body Fastify refuses before the handler (no or another content type, too large, unreadable): the
    // specification's 400, audited like every other refused logout.
    scope.setErrorHandler((err: Error & { statusCode?: number }, request, reply) => {
      if (err.statusCode !== undefined && err.statusCode < 500) return receiver.refuse(request, reply, { result: 'malformed_request' })
      throw err
    })
    scope.post(path, { config: OWN_ROUTE, bodyLimit: BODY_LIMIT }, async (request, reply) => receiver.handle(request, reply))
  })
}

class LogoutReceiver {
  private readonly verifier
  private readonly allowed: ReadonlySet<string>
  private readonly audiences: readonly string[]
  private readonly localJtis = new Map<string, number>()

  constructor (private readonly opts: LogoutOptions) {
    const { auth } = opts.config
    this.allowed = new Set<string>(auth.algorithms)
    this.audiences = auth.backchannelLogout.audiences.length > 0 ? auth.backchannelLogout.audiences : auth.audiences
    this.verifier = createVerifier({
      key: async (decoded: { header: Claims }) => this.key(decoded.header),
      algorithms: auth.algorithms,
      complete: true,
      cache: false,
      clockTolerance: auth.clockToleranceSec * 1000
    })
  }

  async handle (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply> {
    const token = logoutToken(request.body)
    if (token === undefined) return this.refuse(request, reply, { result: 'malformed_request' })
    // An address over the failed-token limit: its tokens are still verified (a genuine logout is never lost
    // to it), except one whose key is not known already (no JWKS fetch); any that fails gets 429.
    const blocked = this.opts.failures.blockedFor(request.ip)
    const checked = blocked > 0 && !this.opts.keys.hasKeyFor(token, this.allowed) ? { result: 'unknown_kid' as const } : await this.check(token)
    if ('result' in checked) {
      if (blocked > 0) {
        this.opts.audit.logout(request, checked)
        return send(reply, TOO_MANY_FAILURES, blocked)
      }
      this.opts.failures.record(request.ip)
      return this.refuse(request, reply, checked)
    }
    const { sub, sid } = checked
    if (!await this.firstUse(checked)) return this.refuse(request, reply, { result: 'replayed', sub, sid })
    try {
      // A session id names the session; a sub alone means every session of the user (section 2.4).
      if (sid !== undefined) await this.opts.revocations.revoke('sid', sid, { cause: 'logout', localOnFailure: true })
      else await this.opts.revocations.revoke('sub', sub as string, { at: checked.iat, cause: 'logout', localOnFailure: true })
    } catch (err) {
      request.log.error({ err: { message: (err as Error).message } }, 'back-channel logout applied to this replica only: the revocation store failed')
      return this.refuse(request, reply, { result: 'store_unavailable', sub, sid })
    }
    this.opts.audit.logout(request, { result: 'accepted', sub, sid })
    return send(reply, LOGOUT_DONE)
  }

  refuse (request: FastifyRequest, reply: FastifyReply, o: Refused): FastifyReply {
    this.opts.audit.logout(request, o)
    return send(reply, logoutAnswer(o.result))
  }

  /** Section 2.6: signature, alg, iss, aud, iat/exp, events, sub or sid, no nonce, typ; the claims or why not. */
  private async check (token: string): Promise<LogoutClaims | Refused> {
    const header = tokenHeader(token)
    if (header === undefined) return { result: 'malformed' }
    if (header.typ !== undefined && (typeof header.typ !== 'string' || !LOGOUT_TYP.has(header.typ.toLowerCase()))) return { result: 'wrong_token_type' }
    let payload: Claims
    try {
      payload = (await this.verifier(token) as { payload: Claims }).payload
    } catch (err) {
      return { result: classify(err as Error) }
    }
    const sub = nonEmpty(payload.sub)
    const sid = nonEmpty(payload.sid)
    const result = this.claimProblem(payload, sub, sid)
    if (typeof result === 'string') return { result, sub, sid }
    return { sub, sid, iat: payload.iat as number, jti: payload.jti as string, deadAt: result }
  }

  /** The claim checks after the signature (section 2.6 steps 4-7): the token's end (epoch ms), or the problem. */
  private claimProblem (payload: Claims, sub: string | undefined, sid: string | undefined): number | Refusal {
    const { auth } = this.opts.config
    if (payload.iss !== auth.issuer) return 'wrong_issuer'
    const aud = Array.isArray(payload.aud) ? payload.aud : [payload.aud]
    if (!aud.some((a) => typeof a === 'string' && this.audiences.includes(a))) return 'wrong_audience'
    const { iat, jti, exp } = payload
    if (typeof iat !== 'number' || !Number.isFinite(iat) || typeof jti !== 'string' || jti.length === 0 || jti.length > 256) return 'missing_claim'
    if (sub === undefined && sid === undefined) return 'missing_claim'
    const events = payload.events as Claims | undefined
    const event = typeof events === 'object' && events !== null ? events[LOGOUT_EVENT] : undefined
    if (typeof event !== 'object' || event === null || Array.isArray(event)) return 'missing_event'
    if ('nonce' in payload) return 'nonce_present'
    const toleranceMs = auth.clockToleranceSec * 1000
    const now = Date.now()
    if (iat * 1000 > now + toleranceMs) return 'malformed' // issued in the future
    // fast-jwt has checked `exp` when present; without it the token's age stands in.
    const deadAt = typeof exp === 'number' ? exp * 1000 + toleranceMs : (iat + MAX_LOGOUT_TOKEN_AGE_S) * 1000 + toleranceMs
    if (deadAt <= now) return 'expired'
    return deadAt
  }

  /** The key for a logout token's header, under the access tokens' rules (allowlist, kid, JWKS). */
  private async key (header: Claims): Promise<string> {
    const alg = header.alg
    if (typeof alg !== 'string' || !this.allowed.has(alg)) throw KEY_ERRORS.alg_not_allowed
    const kid = header.kid
    if (kid !== undefined && typeof kid !== 'string') throw KEY_ERRORS.malformed
    const r = await this.opts.keys.lookup(kid, alg)
    if ('key' in r) return r.key.pem
    throw KEY_ERRORS[r.error]
  }

  /**
   * True the first time a `jti` is presented (remembered until the token
   * expires): in Redis when there is one (SET NX, so every replica shares
   * it), else in this process. Redis failing: this process's memory decides.
   */
  private async firstUse (c: LogoutClaims): Promise<boolean> {
    const id = createHash('sha256').update(`${this.opts.config.auth.issuer} ${c.jti}`).digest('base64url')
    const ttlMs = Math.max(1000, Math.ceil(c.deadAt - Date.now()))
    const redis = this.opts.redis
    if (redis !== undefined) {
      try {
        const set = await redis.set(`${this.opts.config.rateLimit.keyPrefix}logout:jti:${id}`, '1', 'PX', ttlMs, 'NX')
        if (set === null) return false
      } catch {}
    }
    return this.firstUseLocally(id, c.deadAt)
  }

  private firstUseLocally (id: string, deadAt: number): boolean {
    const now = Date.now()
    const seen = this.localJtis.get(id)
    if (seen !== undefined && seen > now) return false
    if (this.localJtis.size >= MAX_LOCAL_JTIS) {
      for (const [k, until] of this.localJtis) if (until <= now) this.localJtis.delete(k)
      // Still full: forget the oldest (insertion order).
      if (this.localJtis.size >= MAX_LOCAL_JTIS) this.localJtis.delete(this.localJtis.keys().next().value as string)
    }
    this.localJtis.set(id, deadAt)
    return true
  }
}

/** The one `logout_token` of a parsed form body, or undefined. */
function logoutToken (body: unknown): string | undefined {
  if (!(body instanceof URLSearchParams)) return undefined
  const all = body.getAll('logout_token')
  return all.length === 1 && (all[0] as string).length > 0 ? all[0] : undefined
}

function nonEmpty (v: unknown): string | undefined {
  return typeof v === 'string' && v.length > 0 ? v : undefined
}

function classify (err: Error & { code?: string, originalError?: unknown }): Refusal {
  if (err instanceof KeyError) return err.reason
  if (err.originalError instanceof KeyError) return err.originalError.reason
  switch (err.code) {
    case 'FAST_JWT_EXPIRED': return 'expired'
    case 'FAST_JWT_INVALID_SIGNATURE': return 'bad_signature'
    case 'FAST_JWT_INVALID_ALGORITHM': return 'alg_not_allowed'
    default: return 'malformed'
  }
}
