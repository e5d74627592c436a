// Open-loop (fixed-rate) load: requests leave on a schedule, whether or not
// earlier ones have been answered, and each latency is measured from the
// moment the request was DUE, not from when it was sent. A subject that
// stalls therefore shows the stall in every request scheduled during it
// (no coordinated omission, unlike a closed loop such as autocannon's).
// The scheduler ticks with setTimeout (about 1 ms granularity): the same
// small offset lands on every subject, so compare subjects with each other
// (the bench reports "added vs direct").
import { Pool } from 'undici'

/**
 * @param {string} origin  http://host:port
 * @param {{ path: string, rate: number, seconds: number, tokens?: string[], connections?: number, timeoutMs?: number }} o
 * @returns {Promise<{ latencies: Float64Array, sent: number, ok: number, non2xx: number, errors: number, lateMs: number }>}
 */
export async function openLoop (origin, { path, rate, seconds, tokens, connections = 256, timeoutMs = 10_000 }) {
  const pool = new Pool(origin, { connections, pipelining: 1, keepAliveTimeout: 60_000 })
  const total = Math.max(1, Math.round(rate * seconds))
  const latencies = new Float64Array(total).fill(NaN)
  let ok = 0
  let non2xx = 0
  let errors = 0
  let sent = 0
  let done = 0
  let lateMs = 0 // how far behind schedule the sender itself ever was
  const start = performance.now() + 5
  const interval = 1000 / rate

  await new Promise((resolve) => {
    const finish = () => { if (++done === total) resolve() }
    const fire = (i, due) => {
      const t = tokens?.length ? tokens[i % tokens.length] : undefined
      pool.request({ path, method: 'GET', headers: t ? { authorization: `Bearer ${t}` } : {}, headersTimeout: timeoutMs, bodyTimeout: timeoutMs })
        .then(async (res) => {
          await res.body.arrayBuffer()
          latencies[i] = performance.now() - due
          if (res.statusCode >= 200 && res.statusCode < 300) ok++
          else non2xx++
        }, () => { errors++ })
        .finally(finish)
    }
    const tick = () => {
      const now = performance.now()
      while (sent < total) {
        const due = start + sent * interval
        if (due > now) break
        lateMs = Math.max(lateMs, now - due)
        fire(sent, due)
        sent++
      }
      if (sent < total) setTimeout(tick, Math.max(0, Math.min(1, start + sent * interval - performance.now())))
    }
    setTimeout(tick, 5)
  })
  await pool.close()
  const answered = latencies.filter((x) => !Number.isNaN(x)).sort()
  return { latencies: answered, sent, ok, non2xx, errors, lateMs }
}

/** The q-quantile (0..1) of an ascending array, nearest rank. */
export function quantile (sorted, q) {
  if (sorted.length === 0) return undefined
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]
}
