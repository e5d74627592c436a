/**
 * Per-user request limits, applied after authentication (preHandler) to every
 * proxied request and every WebSocket upgrade (an upgrade is a request).
 * Counting is @fastify/rate-limit's limiter over the shared LimitStore, keyed
 * by the verified `sub`, never by IP for authenticated traffic.
 *
 * Which budget applies, most specific first:
 *   1. exempt subs/roles (service accounts): no limit;
 *   2. a rateLimit.routes rule (method + path) -> its own budget for that route;
 *   3. the first rateLimit.roles entry the caller has (e.g. premium: 1000/min);
 *   4. the default RATE_LIMIT_MAX per RATE_LIMIT_WINDOW.
 * (2) counts separately from the user's budget; (3) and (4) are the user's one
 * budget, whatever the method or path. Public paths are limited per client IP.
 */
import rateLimit from '@fastify/rate-limit'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { LiveConfig } from '../config/live.js'
import { ruleAppliesTo } from '../config/patterns.js'
import { rulePath } from '../http/target.js'
import { LIMITS_UNAVAILABLE, send, TOO_MANY_REQUESTS } from '../http/answers.js'
import { isOwnRoute } from '../http/own-route.js'
import type { Audit } from '../observability/audit.js'
import type { Identity } from '../auth/identity.js'
import { AuthFailureLimiter } from './auth-failures.js'
import { StoreUnavailableError } from '../errors.js'
import { BREAKER_MS, type LimitStore } from './store.js'

export type LimitReason = 'user_limit' | 'route_limit' | 'ip_limit'

export interface LimitPolicy {
  key: string
  max: number
  windowMs: number
  reason: LimitReason
}

export interface HttpLimitOptions {
  live: LiveConfig
  store: LimitStore
  audit: Audit
}

/** Exempt callers (service accounts) skip every limit: requests, WebSocket messages and connections. */
export function isExempt (id: Identity, limits: Config['rateLimit']): boolean {
  const { exempt } = limits
  return exempt.subs.includes(id.sub) || (exempt.roles.length > 0 && id.roles.some((r) => exempt.roles.includes(r)))
}

export function policyFor (request: FastifyRequest, limits: Config['rateLimit']): LimitPolicy | null {
  const id = request.identity
  if (id === null) {
    return { key: `ip${limits.windowMs}:${AuthFailureLimiter.clientKey(request.ip)}`, max: limits.max, windowMs: limits.windowMs, reason: 'ip_limit' }
  }
  if (isExempt(id, limits)) return null
  if (limits.routes.length > 0) {
    // request.url is the canonical target by now (auth rewrote it).
    const path = rulePath(request.url)
    for (const rule of limits.routes) {
      if (!ruleAppliesTo(rule.methods, request.method) || !rule.match(path)) continue
      return { key: `${rule.id}:${id.sub}`, max: rule.max, windowMs: rule.windowMs, reason: 'route_limit' }
    }
  }
  for (const r of limits.roles) {
    if (id.roles.includes(r.role)) return { key: `u${r.windowMs}:${id.sub}`, max: r.max, windowMs: r.windowMs, reason: 'user_limit' }
  }
  return { key: `u${limits.windowMs}:${id.sub}`, max: limits.max, windowMs: limits.windowMs, reason: 'user_limit' }
}

function setHeaders (reply: FastifyReply, max: number, remaining: number, resetSeconds: number): void {
  // De-facto X-RateLimit-* (GitHub, Kong, @fastify/rate-limit) and the IETF draft RateLimit-* names.
  reply.header('x-ratelimit-limit', max)
  reply.header('x-ratelimit-remaining', remaining)
  reply.header('x-ratelimit-reset', resetSeconds)
  reply.header('ratelimit-limit', max)
  reply.header('ratelimit-remaining', remaining)
  reply.header('ratelimit-reset', resetSeconds)
}

export async function registerHttpLimits (app: FastifyInstance, opts: HttpLimitOptions): Promise<void> {
  const { live, store, audit } = opts
  const policies = new WeakMap<FastifyRequest, LimitPolicy | null>()

  await app.register(rateLimit, {
    global: false,
    skipOnError: false,
    // The plugin constructs `new store(params)`; hand it our one shared store.
    store: function SharedStore () { return store } as never
  })

  const limiter = app.createRateLimit({
    keyGenerator: (request) => {
      const p = policyFor(request, live.current.rateLimit)
      policies.set(request, p)
      return p === null ? 'exempt' : p.key
    },
    allowList: (request) => policies.get(request) === null,
    max: (request) => (policies.get(request) as LimitPolicy).max,
    timeWindow: (request) => (policies.get(request) as LimitPolicy).windowMs
  })

  app.addHook('preHandler', async (request, reply) => {
    // The gateway's own endpoints: the logout endpoint's failures count in the per-IP failed-token limit instead.
    if (isOwnRoute(request)) return
    let r
    try {
      r = await limiter(request)
    } catch (err) {
      if (!(err instanceof StoreUnavailableError)) throw err
      return send(reply, LIMITS_UNAVAILABLE, Math.ceil(BREAKER_MS / 1000))
    }
    if (r.isAllowed) return // exempt
    const resetSeconds = r.ttlInSeconds ?? 0
    setHeaders(reply, r.max ?? 0, r.remaining ?? 0, resetSeconds)
    if (r.isExceeded === true) {
      const policy = policies.get(request) as LimitPolicy
      audit.denied(request, { event: 'rate_limited', reason: policy.reason, transport: request.transport, status: 429, sub: request.identity?.sub })
      return send(reply, TOO_MANY_REQUESTS, Math.max(1, resetSeconds))
    }
  })
}
