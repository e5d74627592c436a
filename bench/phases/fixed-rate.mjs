// Part 1b, fixed rate: the HTTP subjects of part 1, still warm, at a fixed
// request rate (open loop, lib/open-loop.mjs): the latency each one adds.
import { fmt, fmtNoise, median } from '../lib/format.mjs'
import { cpuWindow } from '../lib/load.mjs'
import { openLoop, quantile } from '../lib/open-loop.mjs'
import { REQUEST_PATH } from '../lib/setup.mjs'
import { S } from '../settings.mjs'

/**
 * BENCH_RATE=auto (the default): sets S.rate.rps to 40% of the slowest HTTP
 * subject's closed-loop req/s in part 1 (`rows`), at most 1000, in steps of
 * 50; 0 (part 1b skipped) without part 1.
 */
export function chooseRate (rows) {
  if (S.rate.rps !== 'auto') return
  const slowest = Math.min(...(rows ?? []).map((r) => r.rps).filter((x) => Number.isFinite(x)))
  S.rate.rps = Number.isFinite(slowest) ? Math.max(50, Math.min(1000, Math.floor(0.4 * slowest / 50) * 50)) : 0
  if (S.rate.rps > 0) console.log(`fixed rate: ${S.rate.rps} req/s (40% of the slowest subject's ${fmt.int(slowest)} req/s, at most 1000; BENCH_RATE overrides)`)
}

/** Part 1b. Returns one row per subject: percentiles over all rounds' requests, "added" vs direct. */
export async function ratePhase (ctx, subjects, tokens, watch) {
  const jwts = tokens.map((t) => t.jwt)
  const per = new Map(subjects.map((s) => [s.name, { lat: [], total: 0, bad: 0, cpu: [], late: 0, noise: [] }]))
  for (let round = 1; round <= S.rate.rounds; round++) {
    const order = subjects.map((_s, i) => subjects[(i + round - 1) % subjects.length])
    for (const s of order) {
      const run = ctx.httpRuns.get(s.name)
      if (S.rate.warmup > 0) await openLoop(run.url, { path: `${REQUEST_PATH}fixed-rate`, rate: S.rate.rps, seconds: S.rate.warmup, tokens: s.auth ? jwts : undefined })
      const win = cpuWindow([{ label: 'subject', pid: run.pid }, ...run.others], ctx.pin)
      const r = await openLoop(run.url, { path: `${REQUEST_PATH}fixed-rate`, rate: S.rate.rps, seconds: S.rate.duration, tokens: s.auth ? jwts : undefined })
      const { cpu, noise } = win.stop().summarize(r.sent)
      watch.check()
      const acc = per.get(s.name)
      acc.lat.push(r.latencies)
      acc.total += r.sent
      acc.bad += r.non2xx + r.errors
      acc.cpu.push(cpu[0].usPerReq)
      acc.late = Math.max(acc.late, r.lateMs)
      acc.noise.push(noise.subjectCore ?? noise.machine)
      console.log(`fixed rate round ${round}/${S.rate.rounds} ${s.name.padEnd(16)} ${fmt.int(S.rate.rps)} req/s  p50 ${fmt.ms(quantile(r.latencies, 0.5))} ms  ` +
        `p99 ${fmt.ms(quantile(r.latencies, 0.99))} ms  max ${fmt.ms(r.latencies[r.latencies.length - 1])} ms  ${fmt.us(cpu[0].usPerReq)} µs/req  other load ${fmtNoise(noise)}` +
        `${r.non2xx + r.errors ? `  NON-2XX/ERRORS: ${r.non2xx + r.errors}` : ''}`)
    }
  }
  return summarize(subjects, per)
}

/** Per subject: percentiles over every round's requests together, median CPU, "added" = minus direct's. */
function summarize (subjects, per) {
  const rows = subjects.map((s) => {
    const acc = per.get(s.name)
    const all = Float64Array.from(acc.lat.flatMap((a) => [...a])).sort()
    return {
      name: s.name,
      p50: quantile(all, 0.5),
      p90: quantile(all, 0.9),
      p99: quantile(all, 0.99),
      p999: quantile(all, 0.999),
      max: all[all.length - 1],
      cpu: median(acc.cpu),
      bad: acc.bad,
      late: acc.late,
      noise: Math.max(...acc.noise.filter((x) => Number.isFinite(x)))
    }
  })
  const direct = rows.find((r) => r.name === 'direct')
  for (const r of rows) {
    r.added50 = direct ? r.p50 - direct.p50 : undefined
    r.added99 = direct ? r.p99 - direct.p99 : undefined
  }
  return rows
}
