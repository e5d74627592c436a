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
import { normalizePath } from '../config/patterns.js'
import type { Audit } from '../observability/audit.js'
import type { AuthFailureReason, Transport } from '../observability/metrics.js'
import { authChallenge, FORBIDDEN, type Challenge } from './challenge.js'
import { checkClaims, type Claims, type Identity } from './identity.js'
import type { KeyStore } from './keys.js'
import { extractToken } from './token.js'
import { transportAllowsToken } from './transport.js'
import type { AuthFailureLimiter } from '../limits/auth-failures.js'
import type { Revocations } from './revocation.js'

export interface AuthOptions {
  /** The configuration in force: public paths and role rules are read per request (reloadable). */
  live: LiveConfig
  config: Config
  keys: KeyStore
  audit: Audit
  /** Per-IP limit on failed authentications (checked before any token work). */
  failures: AuthFailureLimiter
  revocations: Revocations
}

const TOO_MANY_FAILURES = JSON.stringify({ error: 'rate_limited', error_description: 'Too many failed authentications from this address' })

/** Thrown into @fastify/jwt from the key callback; preallocated, no stack per request. */
class KeyError extends Error {
  constructor (readonly reason: AuthFailureReason) { super(reason) }
}
const KEY_ERRORS: Partial<Record<AuthFailureReason, KeyError>> = {
  alg_not_allowed: new KeyError('alg_not_allowed'),
  unknown_kid: new KeyError('unknown_kid'),
  jwks_unavailable: new KeyError('jwks_unavailable'),
  malformed: new KeyError('malformed')
}

interface DecodedToken { header: Claims, payload: Claims }

export function isUpgrade (request: FastifyRequest): boolean {
  const u = request.headers.upgrade
  return u !== undefined && u.toLowerCase() === 'websocket'
}

export function send (reply: FastifyReply, c: Challenge): FastifyReply {
  return reply.code(c.status).headers(c.headers).send(c.body)
}

async function authPlugin (app: FastifyInstance, opts: AuthOptions): Promise<void> {
  const { live, config, keys, audit, failures, revocations } = opts
  const allowed = new Set<string>(config.auth.algorithms)

  app.decorateRequest('identity', null)
  app.decorateRequest('transport', 'http')
  app.decorateRequest('bearerToken', null)
  app.decorateRequest('keyResolved', false)

  await app.register(fastifyJwt, {
    secret: (request: FastifyRequest, token: DecodedToken, cb: (err: Error | null, key?: string) => void) => {
      const alg = token.header.alg
      if (typeof alg !== 'string' || !allowed.has(alg)) return cb(KEY_ERRORS.alg_not_allowed as KeyError)
      const kid = token.header.kid
      if (kid !== undefined && typeof kid !== 'string') return cb(KEY_ERRORS.malformed as KeyError)
      const found = keys.lookup(kid, alg)
      if ('then' in found) {
        found.then((r) => {
          if ('key' in r) { request.keyResolved = true; cb(null, r.key.pem) } else cb(KEY_ERRORS[r.error] as KeyError)
        }, cb)
        return
      }
      if ('key' in found) { request.keyResolved = true; cb(null, found.key.pem) } else cb(KEY_ERRORS[found.error] as KeyError)
    },
    decode: { complete: true },
    verify: {
      algorithms: config.auth.algorithms,
      clockTolerance: config.auth.clockToleranceSec * 1000, // fast-jwt takes ms
      cache: config.auth.verifyCacheSize > 0 ? config.auth.verifyCacheSize : false,
      complete: true,
      extractToken: (request: FastifyRequest) => request.bearerToken ?? undefined
    }
  } as never)

  function deny (request: FastifyRequest, reply: FastifyReply, reason: AuthFailureReason, transport: Transport, sub?: string): FastifyReply {
    const c = authChallenge(reason)
    audit.denied(request, { event: 'auth_failure', reason, transport, status: c.status, sub })
    failures.record(request.ip)
    return send(reply, c)
  }

  app.addHook('onRequest', async (request, reply) => {
    const transport: Transport = isUpgrade(request) ? 'ws' : 'http'
    request.transport = transport
    const auth = live.current.auth

    let path: string | undefined
    if (auth.publicPaths.length > 0 || auth.routes.length > 0) {
      path = normalizePath(request.url)
      if (path === undefined) return deny(request, reply, 'invalid_path', transport)
      if (auth.isPublic(path)) return
    }

    const wait = failures.blockedFor(request.ip)
    if (wait > 0) {
      audit.denied(request, { event: 'rate_limited', reason: 'auth_failures', transport, status: 429 })
      return reply.code(429).header('retry-after', wait).type('application/json; charset=utf-8').send(TOO_MANY_FAILURES)
    }

    const found = extractToken({
      authorization: request.headers.authorization,
      url: request.url,
      protocolHeader: request.headers['sec-websocket-protocol'],
      upgrade: transport === 'ws'
    })
    if (found.kind === 'none') return deny(request, reply, 'missing_token', transport)
    if (found.kind === 'multiple') return deny(request, reply, 'multiple_tokens', transport)
    if (found.kind === 'malformed') return deny(request, reply, 'malformed', transport)
    if (!transportAllowsToken(request, config.server.allowInsecureHttp)) return deny(request, reply, 'insecure_transport', transport)

    request.bearerToken = found.token
    let verified: DecodedToken
    try {
      verified = await request.jwtVerify<DecodedToken>()
    } catch (err) {
      return deny(request, reply, classify(err as Error & { code?: string }, request.keyResolved), transport)
    } finally {
      request.bearerToken = null
    }

    const identity = checkClaims(auth, verified.header, verified.payload)
    if (typeof identity === 'string') {
      const sub = typeof verified.payload.sub === 'string' ? verified.payload.sub : undefined
      return deny(request, reply, identity, transport, sub)
    }
    revocations.observe(identity.exp)
    if (revocations.isRevoked(identity)) return deny(request, reply, 'revoked', transport, identity.sub)
    request.identity = identity

    if (path !== undefined && !rolesAllow(auth.routes, request.method, path, identity)) {
      audit.denied(request, { event: 'forbidden', reason: 'missing_role', transport, status: 403, sub: identity.sub })
      return send(reply, FORBIDDEN)
    }
  })
}

/** Every matching rule must be satisfied: adding a rule never loosens access. */
function rolesAllow (rules: Config['auth']['routes'], method: string, path: string, identity: Identity): boolean {
  for (const rule of rules) {
    if (rule.methods.length > 0 && !(rule.methods as string[]).includes(method)) continue
    if (!rule.match(path)) continue
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
