// The closed-loop HTTP load of `npm run bench` (autocannon) and the CPU
// accounting around a measured window, plus the watch that stops the load
// when a child dies.
import autocannon from 'autocannon'
import { busySeconds, cpuSeconds, describeTail, rssKiB } from './children.mjs'
import { redisCommandStats } from './redis.mjs'
import { REQUEST_PATH } from './setup.mjs'
import { S, SLOW_MS } from '../settings.mjs'

let current // the running autocannon instance, stopped on abort

/**
 * One autocannon run of `seconds` against `url`. The tokens are dealt out
 * to the connections (connection i cycles through its own ceil(N/connections)
 * tokens, like users holding keep-alive connections), so every token is in
 * use and each request is a prebuilt buffer: a per-request setupRequest costs
 * the load generator ~20 µs, and giving every connection the whole list costs
 * seconds of cloning per run. Returns autocannon's result plus our own latency
 * samples (autocannon's histogram has 1 ms resolution) and the longest time
 * without any response (all connections stuck: a stall).
 *
 * `live` (optional, an object): filled while the load runs, for a caller that
 * samples it meanwhile: live.t0 (performance.now() when the load started),
 * live.responses (so far) and live.buckets (responses per second since t0:
 * buckets[i] counts those that arrived in [i s, i+1 s)).
 */
export function runLoad (url, tokens, seconds, { recordLatency, live }) {
  const requests = tokens.map((t, i) => ({
    method: 'GET',
    path: `${REQUEST_PATH}${i}`,
    headers: { authorization: `Bearer ${t.jwt}`, accept: 'application/json' }
  }))
  const perClient = Math.ceil(requests.length / S.connections)
  let clientIndex = 0
  const latencies = recordLatency ? new Latencies() : undefined
  return new Promise((resolve, reject) => {
    const t0 = performance.now()
    let last = t0
    let maxGap = 0
    if (live) Object.assign(live, { t0, responses: 0, buckets: [] })
    current = autocannon({
      url,
      connections: S.connections,
      duration: seconds,
      pipelining: 1,
      requests: requests.slice(0, 1), // replaced per connection below
      setupClient: (client) => {
        const first = (clientIndex++ * perClient) % requests.length
        client.setRequests(Array.from({ length: perClient }, (_x, j) => ({ ...requests[(first + j) % requests.length] })))
      }
    }, (err, result) => {
      current = undefined
      if (err) return reject(err)
      maxGap = Math.max(maxGap, performance.now() - last)
      resolve({ result, latencies, maxGap })
    })
    if (latencies || live) {
      current.on('response', (_client, _status, _bytes, ms) => {
        latencies?.add(ms)
        const now = performance.now()
        if (now - last > maxGap) maxGap = now - last
        last = now
        if (live) {
          live.responses++
          const i = Math.floor((now - t0) / 1000)
          while (live.buckets.length <= i) live.buckets.push(0)
          live.buckets[i]++
        }
      })
    }
  })
}

export class Latencies {
  constructor () { this.a = new Float64Array(1 << 16); this.n = 0 }
  add (ms) {
    if (this.n === this.a.length) {
      const b = new Float64Array(this.a.length * 2)
      b.set(this.a)
      this.a = b
    }
    this.a[this.n++] = ms
  }

  percentiles (...ps) {
    const s = this.a.subarray(0, this.n).sort()
    return ps.map((p) => (this.n === 0 ? NaN : s[Math.min(this.n - 1, Math.max(0, Math.ceil(p * this.n) - 1))]))
  }

  max () { return this.n === 0 ? NaN : this.a.subarray(0, this.n).reduce((m, x) => (x > m ? x : m), 0) }
  countAtLeast (ms) { return this.a.subarray(0, this.n).reduce((c, x) => (x >= ms ? c + 1 : c), 0) }
}

/**
 * CPU accounting around a measured window: utime+stime of each process, the
 * load generator (this process), and busy time of the cores from /proc/stat,
 * whose excess over the bench's own processes is the noise from other users.
 */
export function cpuWindow (pids, pin) {
  const before = pids.map((p) => cpuSeconds(p.pid))
  const cores = pin.applied ? [pin.subjectCpu, pin.loadgenCpu] : [undefined]
  const busy0 = cores.map(busySeconds)
  const lg0 = process.cpuUsage()
  const t0 = process.hrtime.bigint()
  return {
    stop () {
      const wall = Number(process.hrtime.bigint() - t0) / 1e9
      const busy1 = cores.map(busySeconds)
      const after = pids.map((p) => cpuSeconds(p.pid))
      const lg = process.cpuUsage(lg0)
      const loadgenCpuPct = (lg.user + lg.system) / 1e6 / wall * 100
      return {
        wall,
        loadgenCpuPct,
        /** Per-process CPU per unit of work (request, round trip) and the noise. */
        summarize (total) {
          const cpu = pids.map((p, i) => {
            const sec = before[i] === undefined || after[i] === undefined ? undefined : after[i] - before[i]
            return { label: p.label, usPerReq: sec === undefined || total === 0 ? undefined : sec * 1e6 / total, pct: sec === undefined ? undefined : sec / wall * 100 }
          })
          const subjectSide = cpu.reduce((sum, c) => sum + (c.pct ?? 0), 0)
          const busyPct = busy0.map((b, i) => (b === undefined || busy1[i] === undefined ? undefined : (busy1[i] - b) / wall * 100))
          const foreign = (pct, ours) => (pct === undefined ? undefined : Math.max(0, pct - ours))
          const noise = pin.applied
            ? { subjectCore: foreign(busyPct[0], subjectSide), loadgenCore: foreign(busyPct[1], loadgenCpuPct) }
            : { machine: foreign(busyPct[0], subjectSide + loadgenCpuPct) }
          return { cpu, noise }
        }
      }
    }
  }
}

/** Warm-up (discarded) then the measured run, with CPU read around the latter. */
export async function measure (subject, run, tokens, warmupSeconds, pin, seconds = S.duration) {
  let warmupBad = 0
  if (warmupSeconds > 0) {
    const w = await runLoad(run.url, tokens, warmupSeconds, { recordLatency: false })
    warmupBad = w.result.non2xx + w.result.errors + w.result.timeouts
  }
  const pids = [{ label: 'subject', pid: run.pid }, ...run.others]
  const redisCmds0 = run.redis && !run.redisStatsOff ? await redisCommandStats(run.redis.port) : undefined
  const win = cpuWindow(pids, pin)
  const { result, latencies, maxGap } = await runLoad(run.url, tokens, seconds, { recordLatency: true })
  const snap = win.stop()
  const redisCmds1 = redisCmds0 !== undefined ? await redisCommandStats(run.redis.port) : undefined
  const total = result.requests.total
  const { cpu, noise } = snap.summarize(total)
  const [p50, p99] = latencies.percentiles(0.5, 0.99)
  return {
    subject: subject.name,
    rps: total / result.duration,
    total,
    p50,
    p99,
    max: latencies.max(),
    slow: latencies.countAtLeast(SLOW_MS),
    maxGap,
    cpuUsPerReq: cpu[0].usPerReq,
    cpuPct: cpu[0].pct,
    rssKiB: rssKiB(run.pid), // after the measurement: a process that keeps growing round after round leaks
    others: cpu.slice(1),
    loadgenCpuPct: snap.loadgenCpuPct,
    noise,
    // Redis calls per request by command (INFO itself excluded), e.g. { evalsha: 1, incr: 1, pttl: 1 }.
    redisCmdsPerReq: redisCmds1 !== undefined && total > 0
      ? Object.fromEntries(Object.entries(redisCmds1).filter(([k]) => k !== 'info').map(([k, v]) => [k, (v - (redisCmds0[k] ?? 0)) / total]).filter(([, v]) => v > 0.005))
      : undefined,
    non2xx: result.non2xx,
    errors: result.errors,
    timeouts: result.timeouts,
    statusCodes: Object.fromEntries(Object.entries(result.statusCodeStats).map(([k, v]) => [k, v.count])),
    warmupBad
  }
}

/** Stops the running autocannon instance, if any (on abort, or when a child died). */
export function stopLoad () { current?.stop() }

/** Any child dying from now on invalidates the run. */
export function makeWatch () {
  const w = { died: undefined }
  w.add = (child) => {
    if (!child) return
    child.steady = true
    child.onUnexpectedExit = (c) => { w.died ??= `${c.benchName} exited (${c.exitInfo}) during the run\n${describeTail(c)}`; current?.stop() }
  }
  w.check = () => { if (w.died) throw new Error(w.died) }
  return w
}
