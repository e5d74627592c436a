/**
 * Authentication, as one onRequest hook so it runs before body parsing and
 * before any WebSocket upgrade (upgrades are routed through Fastify as GETs):
 *   transport guard -> extract token -> verify (@fastify/jwt + KeyStore)
 *   -> claims -> identity -> role rules (403)
 * Every denial goes through audit.denied() and an RFC 6750 answer.
 */
import fp from 'fastify-plugin'
import fastifyJwt from '@fastify/jwt'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { LiveConfig } from '../config/live.js'
import { ruleAppliesTo } from '../config/patterns.js'
import type { Audit } from '../observability/audit.js'
import type { AuthFailureReason, Transport } from '../observability/metrics.js'
import { authAnswer, FORBIDDEN, send, TOO_MANY_FAILURES } from '../http/answers.js'
import { KEY_ERRORS, KeyError } from '../errors.js'
import { checkClaims, type Claims, type Identity } from './identity.js'
import type { KeyResult, KeyStore } from './keys.js'
import { extractToken } from './token.js'
import { canonicalTarget, rulePath, targetPath } from '../http/target.js'
import { isOwnRoute } from '../http/own-route.js'
import { VerifiedTokens, type VerifiedToken } from './verified.js'
import { isWebSocketHandshake, transportAllowsToken } from './transport.js'
import type { Revocations } from './revocation.js'

/**
 * The per-IP limit on failed tokens as auth uses it; limits/auth-failures.ts
 * implements it over the shared store.
 */
export interface FailedTokenLimit {
  /** Seconds until the IP may try again, or 0 when it is not blocked (a local lookup, no I/O). */
  blockedFor (ip: string): number
  /** Counts one failed token of the IP (in the background: a denial never waits for it). */
  record (ip: string): void
}

export interface AuthOptions {
  /** The configuration in force: public paths and role rules are read per request (reloadable). */
  live: LiveConfig
  config: Config
  keys: KeyStore
  audit: Audit
  /** Per-IP limit on failed authentications (checked before any token work). */
  failures: FailedTokenLimit
  revocations: Revocations
}

interface DecodedToken { header: Claims, payload: Claims }
type Verdict = VerifiedToken | AuthFailureReason | { problem: AuthFailureReason, sub: string | undefined }

/**
 * Failures that count towards the per-IP limit: presented tokens that failed
 * verification (each cost a parse and possibly a signature check or a key
 * lookup). Not counted: no token, a token over plain HTTP, a bad path, the
 * issuer's JWKS being down, a revoked (but genuine) token.
 */
const COUNTED: ReadonlySet<AuthFailureReason> = new Set<AuthFailureReason>([
  'malformed', 'multiple_tokens', 'alg_not_allowed', 'unknown_kid', 'bad_signature', 'expired', 'not_yet_valid',
  'wrong_issuer', 'wrong_audience', 'missing_claim', 'wrong_token_type'
])

async function authPlugin (app: FastifyInstance, opts: AuthOptions): Promise<void> {
  const auth = new Authenticator(opts)
  app.decorateRequest('identity', null)
  app.decorateRequest('transport', 'http')
  await app.register(fastifyJwt, auth.jwtOptions() as never)
  // A callback hook: a cached token is served without a promise per request.
  app.addHook('onRequest', (request, reply, done) => { auth.onRequest(request, reply, done) })
}

/** The auth hook's state and steps; one per gateway. */
class Authenticator {
  private readonly allowed: ReadonlySet<string>
  private readonly clockToleranceMs: number
  private readonly verified: VerifiedTokens
  /**
   * What @fastify/jwt's callbacks need per verification (its extractToken and
   * key callbacks receive only the request): the token to verify, and the key
   * it resolved (a resolved key tells a bad signature from a malformed token,
   * and the verified-token cache keeps it).
   */
  private readonly inFlight = new WeakMap<FastifyRequest, { token: string, pem: string | null }>()

  constructor (private readonly opts: AuthOptions) {
    const { config, live } = opts
    this.allowed = new Set<string>(config.auth.algorithms)
    this.clockToleranceMs = config.auth.clockToleranceSec * 1000
    this.verified = new VerifiedTokens(config.auth.verifyCacheSize)
    // A reload may change issuer, audiences or role clients: nothing verified under the old rules is kept.
    live.onChange(() => { this.verified.clear() })
  }

  /** @fastify/jwt's options: keys from the KeyStore by kid, within the algorithm allowlist. */
  jwtOptions (): object {
    const { config, keys } = this.opts
    return {
      secret: (request: FastifyRequest, token: DecodedToken, cb: (err: Error | null, key?: string) => void) => {
        const alg = token.header.alg
        if (typeof alg !== 'string' || !this.allowed.has(alg)) return cb(KEY_ERRORS.alg_not_allowed)
        const kid = token.header.kid
        if (kid !== undefined && typeof kid !== 'string') return cb(KEY_ERRORS.malformed)
        const answer = (r: KeyResult): void => {
          if ('key' in r) {
            const v = this.inFlight.get(request)
            if (v !== undefined) v.pem = r.key.pem
            cb(null, r.key.pem)
          } else cb(KEY_ERRORS[r.error])
        }
        const found = keys.lookup(kid, alg)
        if ('then' in found) found.then(answer, cb)
        else answer(found)
      },
      decode: { complete: true },
      verify: {
        algorithms: config.auth.algorithms,
        clockTolerance: this.clockToleranceMs, // fast-jwt takes ms
        cache: false, // VerifiedTokens (verified.ts) answers repeated tokens before fast-jwt is called
        complete: true,
        extractToken: (request: FastifyRequest) => this.inFlight.get(request)?.token
      }
    }
  }

  onRequest (request: FastifyRequest, reply: FastifyReply, done: () => void): void {
    const transport: Transport = isWebSocketHandshake(request.raw) ? 'ws' : 'http'
    request.transport = transport
    // One canonical target per request: rules match it and the app receives it.
    const target = canonicalTarget(request.url)
    if (target === undefined) { this.deny(request, reply, 'invalid_path'); return }
    if (target !== request.raw.url) request.raw.url = target
    // The gateway's own endpoints (back-channel logout) check their own credentials.
    if (isOwnRoute(request)) { done(); return }
    const auth = this.opts.live.current.auth
    if (auth.publicPaths.length > 0 && auth.isPublic(targetPath(target))) { done(); return }
    const path = auth.routes.length > 0 ? rulePath(target) : undefined

    // Plain HTTP with a header seen before: the cache is keyed by the whole header value.
    const authorization = request.headers.authorization
    if (transport === 'http' && authorization !== undefined && this.cachedAdmit(request, reply, authorization, path, done)) return

    const found = extractToken({
      authorization,
      url: target,
      protocolHeader: request.headers['sec-websocket-protocol'],
      upgrade: transport === 'ws'
    })
    if (found.kind === 'none') { this.deny(request, reply, 'missing_token'); return }
    // From here on a token was presented: an IP over the failure limit gets 429 for any that fails.
    const blocked = this.opts.failures.blockedFor(request.ip)
    if (found.kind !== 'token') {
      if (blocked > 0) this.tooManyFailures(request, reply, blocked)
      else this.deny(request, reply, found.kind === 'multiple' ? 'multiple_tokens' : 'malformed')
      return
    }
    if (!this.transportAllows(request, reply)) return

    const token = found.token
    // Same keys as above: the header value when the token came in one. A token
    // from the query or the subprotocol is keyed as the header that would carry
    // it, so a key can only ever be hit by a header that really says Bearer.
    const cacheKey = found.source === 'header' && authorization !== undefined ? authorization : `Bearer ${token}`
    if (transport === 'ws' && this.cachedAdmit(request, reply, cacheKey, path, done)) return
    if (blocked > 0 && !this.keyKnown(token)) { this.tooManyFailures(request, reply, blocked); return }
    this.verify(request, token).then((r) => {
      if (typeof r === 'string' || !('identity' in r)) {
        if (blocked > 0) this.tooManyFailures(request, reply, blocked)
        else if (typeof r === 'string') this.deny(request, reply, r)
        else this.deny(request, reply, r.problem, r.sub)
        return
      }
      this.verified.set(cacheKey, r)
      this.admit(request, reply, r.identity, path, done)
    }, done).catch((err: Error) => {
      // A bug after verification (not a token problem): the error handler's 500, never an unhandled rejection.
      if (!reply.sent) reply.send(err)
      else request.log.error({ err }, 'auth hook failed after the reply was sent')
    })
  }

  private deny (request: FastifyRequest, reply: FastifyReply, reason: AuthFailureReason, sub?: string): void {
    const a = authAnswer(reason)
    this.opts.audit.denied(request, { event: 'auth_failure', reason, transport: request.transport, status: a.status, sub })
    if (COUNTED.has(reason)) this.opts.failures.record(request.ip)
    send(reply, a)
  }

  /** An IP over the failure limit whose token did not verify (or was not even tried): 429. */
  private tooManyFailures (request: FastifyRequest, reply: FastifyReply, wait: number): void {
    this.opts.audit.denied(request, { event: 'rate_limited', reason: 'auth_failures', transport: request.transport, status: 429 })
    send(reply, TOO_MANY_FAILURES, wait)
  }

  /** False after answering 401: a token over plaintext where that is not allowed. */
  private transportAllows (request: FastifyRequest, reply: FastifyReply): boolean {
    if (transportAllowsToken(request, this.opts.config.server.allowInsecureHttp)) return true
    this.deny(request, reply, 'insecure_transport')
    return false
  }

  /**
   * While an IP is blocked its tokens are still verified (a genuine token is
   * never refused by this limit), but one whose key is not already known is
   * refused without a JWKS fetch: each bad token costs at most one signature check.
   */
  private keyKnown (token: string): boolean {
    return this.opts.keys.hasKeyFor(token, this.allowed)
  }

  /**
   * A cached verdict for `key`, when its key is still published unchanged and
   * the transport allows a token: admits (or denies on revocation/roles) and
   * returns true. False: not cached, go the full way.
   */
  private cachedAdmit (request: FastifyRequest, reply: FastifyReply, key: string, path: string | undefined, done: () => void): boolean {
    const hit = this.verified.get(key, Date.now())
    if (hit === undefined) return false
    const k = this.opts.keys.lookup(hit.kid, hit.alg)
    if ('then' in k || !('key' in k) || k.key.pem !== hit.pem) return false
    if (this.transportAllows(request, reply)) this.admit(request, reply, hit.identity, path, done)
    return true
  }

  /** Signature, alg, exp/nbf (fast-jwt) and then our claim checks; never rejects for a bad token. */
  private async verify (request: FastifyRequest, token: string): Promise<Verdict> {
    const v = { token, pem: null as string | null }
    this.inFlight.set(request, v)
    let decoded: DecodedToken
    try {
      decoded = await request.jwtVerify<DecodedToken>()
    } catch (err) {
      return classify(err as Error & { code?: string }, v.pem !== null)
    } finally {
      this.inFlight.delete(request)
    }
    const identity = checkClaims(this.opts.live.current.auth, decoded.header, decoded.payload)
    if (typeof identity === 'string') {
      return { problem: identity, sub: typeof decoded.payload.sub === 'string' ? decoded.payload.sub : undefined }
    }
    const kid = decoded.header.kid as string | undefined
    return { identity, kid, alg: decoded.header.alg as string, pem: v.pem ?? '', deadAt: identity.exp * 1000 + this.clockToleranceMs }
  }

  /** A verified identity: revocation, then role rules. */
  private admit (request: FastifyRequest, reply: FastifyReply, identity: Identity, path: string | undefined, done: () => void): void {
    const { revocations, live, audit } = this.opts
    revocations.observe(identity.exp)
    if (revocations.isRevoked(identity)) { this.deny(request, reply, 'revoked', identity.sub); return }
    request.identity = identity
    if (path !== undefined && !rolesAllow(live.current.auth.routes, request.method, path, identity)) {
      audit.denied(request, { event: 'forbidden', reason: 'missing_role', transport: request.transport, status: 403, sub: identity.sub })
      send(reply, FORBIDDEN)
      return
    }
    done()
  }
}

/** Every matching rule must be satisfied: adding a rule never loosens access. */
function rolesAllow (rules: Config['auth']['routes'], method: string, path: string, identity: Identity): boolean {
  for (const rule of rules) {
    if (!ruleAppliesTo(rule.methods, method) || !rule.match(path)) continue
    if (!rule.roles.some((r) => identity.roles.includes(r))) return false
  }
  return true
}

function classify (err: Error & { code?: string }, keyResolved: boolean): AuthFailureReason {
  if (err instanceof KeyError) return err.reason
  switch (err.code) {
    case 'FST_JWT_AUTHORIZATION_TOKEN_EXPIRED': return 'expired'
    case 'FAST_JWT_INACTIVE': return 'not_yet_valid'
    case 'FAST_JWT_INVALID_ALGORITHM': return 'alg_not_allowed'
    case 'FAST_JWT_MISSING_SIGNATURE': return 'malformed'
    case 'FST_JWT_AUTHORIZATION_TOKEN_INVALID': return keyResolved ? 'bad_signature' : 'malformed'
    default: return keyResolved ? 'bad_signature' : 'malformed'
  }
}

export default fp(authPlugin, { fastify: '5.x', name: 'gateway-auth' })
