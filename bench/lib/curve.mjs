// Pure helpers of the cold-start part (bench/phases/cold-start.mjs): a run's
// completed requests per 1-second bucket turned into a warm-up curve. No I/O;
// test/bench-lib.test.ts checks them.
import { median } from './format.mjs'

/** Where the steady window of a run of `seconds` buckets starts (0-based): its last third, at least one bucket. */
export function steadyStart (seconds) {
  return seconds - Math.max(1, Math.floor(seconds / 3))
}

/** The steady rate: the median of the buckets of the steady window. */
export function steadyRate (buckets) {
  if (buckets.length === 0) return undefined
  return median(buckets.slice(steadyStart(buckets.length)))
}

/** Each bucket as a fraction of `steady` (undefined when there is no steady rate). */
export function fractions (buckets, steady) {
  return buckets.map((b) => (steady > 0 ? b / steady : undefined))
}

/**
 * The first second (1-based: second 1 is the bucket [0 s, 1 s) after the load
 * started) whose bucket reaches `threshold` and whose next `hold` buckets do
 * too; near the end of the run, every bucket that is left must. Undefined
 * when no second qualifies.
 */
export function sustainedFrom (fracs, { threshold = 0.9, hold = 3 } = {}) {
  for (let i = 0; i < fracs.length; i++) {
    const run = fracs.slice(i, i + hold + 1)
    if (run.every((f) => f !== undefined && f >= threshold)) return i + 1
  }
  return undefined
}

/** Mean of seconds `from`..`to` (1-based, inclusive); undefined when a bucket is missing. */
export function meanOver (fracs, from, to) {
  const xs = fracs.slice(from - 1, to)
  if (xs.length !== to - from + 1 || xs.some((x) => x === undefined || !Number.isFinite(x))) return undefined
  return xs.reduce((a, b) => a + b, 0) / xs.length
}

/** The seconds a compact curve shows for a run of `period` seconds: 1..10, then 15, 20, 30, 45, 60, 90, 120 up to the period. */
export function curveSeconds (period) {
  return [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 30, 45, 60, 90, 120].filter((s) => s <= period)
}

/** Per-second median over several runs' curves (rounds), as long as the shortest. */
export function medianCurve (curves) {
  if (curves.length === 0) return []
  const n = Math.min(...curves.map((c) => c.length))
  return Array.from({ length: n }, (_x, i) => median(curves.map((c) => c[i])))
}

/**
 * `counter` per unit of `per` between the samples nearest to `from` and `to`
 * seconds: e.g. samples [{ t, cpu (s), responses }] -> CPU µs per request with
 * scale 1e6. Undefined when the window is empty or has no units.
 */
export function ratePerUnit (samples, from, to, counter, per, scale = 1) {
  const a = nearest(samples, from)
  const b = nearest(samples, to)
  if (a === undefined || b === undefined || b.t <= a.t) return undefined
  const dc = b[counter] - a[counter]
  const du = b[per] - a[per]
  if (!Number.isFinite(dc) || !(du > 0)) return undefined
  return dc * scale / du
}

/** The sample whose `t` is nearest to `t`. */
export function nearest (samples, t) {
  let best
  for (const s of samples) if (best === undefined || Math.abs(s.t - t) < Math.abs(best.t - t)) best = s
  return best
}
