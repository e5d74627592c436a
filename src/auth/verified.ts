/**
 * Verified tokens, keyed by the exact token string: a repeated token skips
 * decoding, hashing, the signature check and the claim checks (the hot path is
 * one Map lookup). What a hit still honours:
 *   - expiry: an entry is dead at exp + clock tolerance, as fast-jwt would judge it;
 *   - the key: the token's kid must still be in the key set with the same key
 *     material (a key dropped from the JWKS, or a kid re-published with another
 *     key, sends its tokens back to full verification at the next refresh);
 *   - the configuration: a reload that changes auth settings empties the cache;
 *   - revocation: checked by the caller after every hit, like after a miss.
 * Bounded LRU (JWT_CACHE_SIZE entries; 0 disables). Only successes are kept:
 * a bad token always pays the full check (and the per-IP failure limit).
 */
import type { Identity } from './identity.js'

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

  get size (): number { return this.entries.size }

  get (token: string, now: number): VerifiedToken | undefined {
    const e = this.entries.get(token)
    if (e === undefined) return undefined
    this.entries.delete(token)
    if (e.deadAt <= now) return undefined
    this.entries.set(token, e) // most recently used last
    return e
  }

  set (token: string, entry: VerifiedToken): void {
    if (this.max === 0) return
    if (this.entries.delete(token)) { this.entries.set(token, entry); return }
    if (this.entries.size >= this.max) {
      const oldest = this.entries.keys().next()
      if (oldest.done !== true) this.entries.delete(oldest.value)
    }
    this.entries.set(token, entry)
  }

  clear (): void { this.entries.clear() }
}
