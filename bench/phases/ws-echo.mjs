// Part 3, WebSocket echo: round trips through each path (direct, plain proxy,
// gateway), interleaved rounds like part 1; medians over rounds.
import { fmt, fmtNoise, fmtReasons, median } from '../lib/format.mjs'
import { Latencies, cpuWindow } from '../lib/load.mjs'
import { echoRun } from '../lib/ws-load.mjs'
import { BASELINE, S, WS_BASELINE, WS_PATH } from '../settings.mjs'
import { wsPreflight, wsUrlFor } from './preflight.mjs'

/** Part 3. Returns { rows, results, runs } (runs: the processes, for the report's log lines). */
export async function wsEchoPhase (ctx, subjects, tokens, watch) {
  const runs = await startPaths(ctx, subjects, tokens, watch)
  const run1 = (s, warmupS, measureS, record) => echoOnce(ctx, runs.get(s.name), s, tokens, watch, { warmupS, measureS, record })
  if (S.ws.prime > 0) {
    for (const s of subjects) {
      console.log(`ws: priming ${s.name} for ${S.ws.prime} s`)
      await run1(s, S.ws.prime, 0.1, false)
    }
  }
  const results = []
  for (let round = 1; round <= S.rounds; round++) {
    const order = subjects.map((_s, i) => subjects[(i + round - 1) % subjects.length])
    for (const s of order) {
      const m = await run1(s, S.ws.warmup, S.ws.duration, true)
      m.round = round
      results.push(m)
      const bad = [...m.errors.values()].reduce((a, b) => a + b, 0) + m.mismatches
      console.log(`ws round ${round}/${S.rounds} ${s.name.padEnd(14)} ${fmt.int(m.rtps).padStart(7)} round trips/s  p50 ${fmt.ms(m.p50)} ms  p99 ${fmt.ms(m.p99)} ms  ` +
        `${fmt.us(m.cpuUsPerRt)} µs/rt (${fmt.pct(m.cpuPct)} CPU)  load generator ${fmt.pct(m.loadgenCpuPct)}  other load ${fmtNoise(m.noise)}` +
        `${bad ? `  ERRORS: ${fmtReasons(m.errors)}${m.mismatches ? ` mismatched echoes ${m.mismatches}` : ''}` : ''}`)
    }
  }
  return { rows: aggregate(subjects, results), results, runs }
}

async function startPaths (ctx, subjects, tokens, watch) {
  const runs = new Map()
  for (const s of subjects) {
    const run = await s.start(ctx)
    await wsPreflight(s, run, tokens)
    runs.set(s.name, run)
    for (const c of [run.child, ...(run.extraChildren ?? [])]) watch.add(c)
    console.log(`ws: ${s.name} (pid ${run.pid}) at ${run.url.replace(/^http/, 'ws')}${WS_PATH}: preflight ok${s.auth ? ' (echo with a token, 401 without)' : ' (echo)'}`)
  }
  return runs
}

/** One echo run through `run`: warm-up, then measured (CPU read around it); undefined unless `record`. */
async function echoOnce (ctx, run, s, tokens, watch, { warmupS, measureS, record }) {
  const payload = 'x'.repeat(S.ws.messageBytes)
  const latencies = new Latencies()
  const pids = [{ label: 'subject', pid: run.pid }, ...run.others]
  let win, snap
  const r = await echoRun(wsUrlFor(run, s.auth, tokens), S.ws.echoConnections, {
    warmupS,
    measureS,
    payload,
    latencies,
    hooks: { start: () => { win = cpuWindow(pids, ctx.pin) }, end: () => { snap = win.stop() } }
  })
  watch.check()
  if (!record) return undefined
  const { cpu, noise } = snap.summarize(r.roundTrips)
  const [p50, p99] = latencies.percentiles(0.5, 0.99)
  return {
    subject: s.name,
    rtps: r.roundTrips / r.seconds,
    total: r.roundTrips,
    p50,
    p99,
    cpuUsPerRt: cpu[0].usPerReq,
    // Every subject-side process (proxy + app (+ Redis)): what one round trip costs the subject core.
    totalUsPerRt: cpu.reduce((sum, c) => sum + (c.usPerReq ?? NaN), 0),
    cpuPct: cpu[0].pct,
    others: cpu.slice(1),
    loadgenCpuPct: snap.loadgenCpuPct,
    noise,
    errors: r.errors,
    mismatches: r.mismatches
  }
}

/** Medians over rounds; ratios per round against direct (or the plain proxy), then their median. */
function aggregate (subjects, results) {
  const byRound = (name) => results.filter((r) => r.subject === name)
  const baseRounds = new Map(byRound(WS_BASELINE).map((r) => [r.round, r]))
  const proxyRounds = new Map(byRound(BASELINE).map((r) => [r.round, r]))
  return subjects.map((s) => {
    const rs = byRound(s.name)
    return {
      name: s.name,
      title: s.title,
      rtps: median(rs.map((r) => r.rtps)),
      p50: median(rs.map((r) => r.p50)),
      p99: median(rs.map((r) => r.p99)),
      cpu: median(rs.map((r) => r.cpuUsPerRt)),
      app: median(rs.map((r) => (s.name === WS_BASELINE ? r.cpuUsPerRt : r.others.find((o) => o.label === 'app')?.usPerReq))),
      redis: median(rs.map((r) => r.others.find((o) => o.label === 'redis')?.usPerReq)),
      ratio: baseRounds.size === 0 ? undefined : median(rs.map((r) => { const b = baseRounds.get(r.round); return b && b.rtps ? r.rtps / b.rtps : undefined })),
      perCpuVsDirect: baseRounds.size === 0 ? undefined : median(rs.map((r) => { const b = baseRounds.get(r.round); return b ? b.totalUsPerRt / r.totalUsPerRt : undefined })),
      cpuVsProxy: s.name === WS_BASELINE || proxyRounds.size === 0
        ? undefined
        : median(rs.map((r) => { const b = proxyRounds.get(r.round); return b && b.cpuUsPerRt ? r.cpuUsPerRt / b.cpuUsPerRt : undefined })),
      bad: rs.reduce((n, r) => n + [...r.errors.values()].reduce((a, b) => a + b, 0) + r.mismatches, 0),
      loadgen: median(rs.map((r) => r.loadgenCpuPct))
    }
  })
}
