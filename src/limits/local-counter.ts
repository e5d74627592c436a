/**
 * In-process fixed-window counters, in the store interface (incr(key, cb,
 * windowMs, max) -> { current, ttl }): the limits without Redis, and the
 * per-process fallback while Redis fails (store.ts). The semantics of
 * @fastify/rate-limit's LocalStore as the gateway used it (continueExceeding
 * and exponentialBackoff off): the first hit of a key starts its window
 * (current 1, ttl the whole window), later hits count up with ttl what is
 * left of it, exceeding `max` changes nothing, and a window that has elapsed
 * (measured with the windowMs of this call) starts again from 1. At most
 * `entries` keys are kept, the least recently used evicted first, so a key
 * flood cannot grow memory. Answers synchronously, inside incr().
 */
import type { IncrCallback } from './redis-batch.js'

interface Window { current: number, startMs: number }

export class LocalCounter {
  /** In use order: the least recently used key first. */
  private readonly windows = new Map<string, Window>()

  constructor (private readonly entries: number) {}

  incr (key: string, cb: IncrCallback, windowMs: number, _max: number): void {
    const now = Date.now()
    let w = this.windows.get(key)
    if (w !== undefined) this.windows.delete(key) // set again below: now the most recently used
    if (w === undefined || w.startMs + windowMs <= now) w = { current: 1, startMs: now }
    else w.current++
    this.windows.set(key, w)
    if (this.windows.size > this.entries) this.windows.delete(this.windows.keys().next().value as string)
    cb(null, { current: w.current, ttl: windowMs - (now - w.startMs) })
  }
}
