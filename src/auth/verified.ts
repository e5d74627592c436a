/**
 * Verified tokens, keyed by the exact string they arrived in (the whole
 * `Authorization` header value for plain HTTP, so a hit even skips parsing
 * it; the token itself for WebSocket upgrades): a repeated token skips
 * extraction, decoding, the signature check and the claim checks (the hot
 * path is one Map lookup). What a hit still honours:
 *   - expiry: an entry is dead at exp + clock tolerance, as fast-jwt would judge it;
 *   - the key: the token's kid must still be in the key set with the same key
 *     material (a key dropped from the JWKS, or a kid re-published with another
 *     key, sends its tokens back to full verification at the next refresh);
 *   - the configuration: a reload that changes auth settings empties the cache;
 *   - revocation: checked by the caller after every hit, like after a miss.
 * Bounded (JWT_CACHE_SIZE entries, the oldest evicted first; 0 disables).
 * Only successes are kept:
 * a bad token always pays the full check (and the per-IP failure limit).
 */
import type { Identity } from './identity.js'
import { ownCopy } from '../observability/logger.js'

export interface VerifiedToken {
  identity: Identity
  kid: string | undefined
  alg: string
  /** The key (PEM) that verified it: a hit needs the same key still published under kid. */
  pem: string
  /** ms since epoch after which the token is expired (exp + clock tolerance). */
  deadAt: number
}

export class VerifiedTokens {
  private readonly entries = new Map<string, VerifiedToken>()

  constructor (private readonly max: number) {}

  /** A hit costs one Map lookup: entries are not reordered (eviction is oldest-inserted first). */
  get (key: string, now: number): VerifiedToken | undefined {
    const e = this.entries.get(key)
    if (e === undefined) return undefined
    if (e.deadAt <= now) {
      this.entries.delete(key)
      return undefined
    }
    return e
  }

  set (key: string, entry: VerifiedToken): void {
    if (this.max === 0) return
    key = ownCopy(key) // a token cut out of an upgrade URL would keep the whole URL alive
    if (!this.entries.has(key) && this.entries.size >= this.max) {
      const oldest = this.entries.keys().next()
      if (oldest.done !== true) this.entries.delete(oldest.value)
    }
    this.entries.set(key, entry)
  }

  clear (): void { this.entries.clear() }
}
