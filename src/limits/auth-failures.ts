/**
 * Bad tokens, counted per client IP (the shared store, so all replicas add
 * up). The limit bounds what bad tokens cost, and never locks a real user
 * out:
 *   - only presented tokens that fail verification count (plugin.ts, COUNTED);
 *     a request without a token, a token over plain HTTP, an outage of the
 *     issuer's JWKS or a revoked token do not;
 *   - once an IP is over AUTH_FAILURE_LIMIT_MAX in the window, its tokens are
 *     still verified and a genuine one is served, but one whose key is not
 *     already known is refused (429) without a JWKS fetch, and any other
 *     failure answers 429: each bad token costs at most one signature check,
 *     and none reaches Keycloak.
 *
 * The hot path for good requests is only `blockedFor()`: a local Map lookup,
 * no Redis round trip. Counting happens on failures only, in the background;
 * a replica learns that an IP is blocked from its own count's answer, which
 * already includes every replica's failures. While an IP is blocked its
 * failures are not counted again (the block lasts until its window ends).
 */
import { createRequire } from 'node:module'
import type { FailedTokenLimit } from '../auth/plugin.js'
import type { LimitStore } from './store.js'

const require = createRequire(import.meta.url)
const { normalizeIP } = require('@fastify/rate-limit') as { normalizeIP: (ip: string, ipv6Subnet: number) => string }

/** IPv6 clients are grouped by /64: one host usually owns a whole /64. */
export const IPV6_SUBNET = 64
/** Blocked IPs remembered locally; the oldest are dropped beyond this. */
export const MAX_BLOCKED = 100_000

export class AuthFailureLimiter implements FailedTokenLimit {
  private readonly blocked = new Map<string, number>()

  constructor (
    private readonly store: LimitStore,
    /** Read at each failure, so a config reload applies. */
    private readonly limit: () => { max: number, windowMs: number }
  ) {}

  static clientKey (ip: string): string {
    return normalizeIP(ip, IPV6_SUBNET)
  }

  /** Seconds until the IP may try again, or 0 when it is not blocked. */
  blockedFor (ip: string, now = Date.now()): number {
    if (this.blocked.size === 0) return 0
    const until = this.blocked.get(AuthFailureLimiter.clientKey(ip))
    if (until === undefined) return 0
    if (until <= now) {
      this.blocked.delete(AuthFailureLimiter.clientKey(ip))
      return 0
    }
    return Math.ceil((until - now) / 1000)
  }

  /** Counts one failure (fire and forget: a denial never waits for Redis). */
  record (ip: string): void {
    const key = AuthFailureLimiter.clientKey(ip)
    const { max, windowMs } = this.limit()
    this.store.incr(`authfail:${key}`, (err, res) => {
      // Blocked once the count reaches max: the next request from the IP gets 429.
      if (err !== null || res === undefined || res.current < max) return
      if (this.blocked.size >= MAX_BLOCKED) {
        const oldest = this.blocked.keys().next().value
        if (oldest !== undefined) this.blocked.delete(oldest)
      }
      this.blocked.set(key, Date.now() + Math.max(res.ttl, 1000))
    }, windowMs, max)
  }
}
