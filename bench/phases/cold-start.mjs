// Part 5, cold start: how fast a FRESH gateway serves from its first second.
// Per variant and round: a new gateway process (the `gateway` row's settings,
// plus the variant's node flags / env), /readyz 200, then at once the HTTP
// part's closed-loop load for BENCH_COLD_START_SECONDS, counted per second.
import { busySeconds, cpuSeconds, stopChild } from '../lib/children.mjs'
import { curveSeconds, fractions, meanOver, medianCurve, ratePerUnit, steadyRate, steadyStart, sustainedFrom } from '../lib/curve.mjs'
import { fmt, median } from '../lib/format.mjs'
import { runLoad } from '../lib/load.mjs'
import { logSummary, sleep } from '../lib/probes.mjs'
import { S } from '../settings.mjs'
import { SUBJECTS, startColdStartGateway } from '../subjects/index.mjs'
import { preflight } from './preflight.mjs'

/** Seconds of the first window (its mean fraction and CPU/request). */
export const FIRST = 5
/** A second counts as "at speed" at this fraction of steady, and the next HOLD seconds must be too. */
export const THRESHOLD = 0.9
export const HOLD = 3

/**
 * Part 5. Rounds interleaved (order rotated), each run a fresh process.
 * Returns { rows (one per variant), runs (every run), primed }.
 */
export async function coldStartPhase (ctx, variants, tokens, watch) {
  const subject = SUBJECTS.find((s) => s.name === 'gateway') // what the preflight checks after each run
  // The app and this process's load generator, warm before the first variant: otherwise only the first
  // variant would meet a cold app and a cold autocannon. Through a throwaway gateway, so that the app warms up
  // on what it gets in the runs (forwarded requests over the gateway's upstream connections); 5 s of direct load
  // left the app ~1.5x slower per request during the first variant's minute than during the later ones.
  const primed = S.coldStart.prime
  const first = Math.min(FIRST, S.coldStart.seconds)
  if (primed > 0) {
    console.log(`cold start: priming the app and the load generator for ${primed} s through a throwaway gateway`)
    const warm = await startColdStartGateway(ctx, { nodeFlags: [], env: {} }, 'cold-prime')
    watch.add(warm.child)
    await runLoad(warm.url, tokens, primed, { recordLatency: false })
    watch.check()
    await stopChild(warm.child)
    await sleep(500)
  }
  const runs = []
  for (let round = 1; round <= S.coldStart.rounds; round++) {
    const order = variants.map((_v, i) => variants[(i + round - 1) % variants.length])
    for (const v of order) {
      const r = await coldRun(ctx, subject, v, tokens, watch)
      r.round = round
      runs.push(r)
      console.log(`cold start round ${round}/${S.coldStart.rounds} ${v.name.padEnd(14)} ready after ${fmt.int(r.readyMs)} ms (${fmt.int(r.startCpuMs)} ms CPU); ` +
        `steady ${fmt.int(r.steady)} req/s; s1..s${Math.min(10, r.fracs.length)} ${r.fracs.slice(0, 10).map(fmt.n2).join(' ')}; ` +
        `≥${THRESHOLD * 100}% from s${r.sustained ?? ' never'}; mean s1–${first} ${fmt.n2(r.firstMean)}; ` +
        `CPU µs/req s1–${first} ${fmt.us(r.cpuFirst)} vs steady ${fmt.us(r.cpuSteady)} (app ${fmt.us(r.appCpuFirst)} vs ${fmt.us(r.appCpuSteady)}); ` +
        `CPU curve s1..s${Math.min(10, r.cpuFracs.length)} ${r.cpuFracs.slice(0, 10).map(fmt.n2).join(' ')}; ` +
        `other load subject core s1–${first} ${fmt.pct(r.noiseFirst)}, steady ${fmt.pct(r.noiseSteady)}, whole ${fmt.pct(r.noise)}; load-generator core s1–${first} ${fmt.pct(r.lgNoiseFirst)}, whole ${fmt.pct(r.lgNoise)}` +
        `${r.control ? `; warm restart of the load: s1 ${fmt.n2(r.control.fracs[0])}, mean ${fmt.n2(r.control.mean)}` : ''}` +
        `${r.bad ? `  NON-2XX/ERRORS: ${r.bad}` : ''}`)
    }
  }
  return { rows: aggregate(variants, runs), runs, primed }
}

/** One fresh gateway: started, timed to /readyz 200, loaded at once for the period, (control), preflight, stopped. */
async function coldRun (ctx, subject, v, tokens, watch) {
  const period = S.coldStart.seconds
  const t0 = performance.now()
  const run = await startColdStartGateway(ctx, v, `cold-${v.name}`)
  const readyMs = performance.now() - t0
  watch.add(run.child)
  const startCpu = cpuSeconds(run.pid)

  // Load at once; one extra second so that the last counted bucket is complete (it is dropped).
  const live = {}
  const samples = []
  const sampler = startSampler(run, ctx, live, samples)
  const { result } = await runLoad(run.url, tokens, period + 1, { recordLatency: false, live })
  sampler.stop()
  watch.check()
  const buckets = Array.from({ length: period }, (_x, i) => live.buckets[i] ?? 0)
  const steady = steadyRate(buckets)
  const fracs = fractions(buckets, steady)
  const steadyFrom = steadyStart(period) // the window steadyRate took its median over
  const first = Math.min(FIRST, period)
  const pct = (from, to, key) => ratePerUnit(samples, from, to, key, 't', 100)
  // Other users' share of the subject core (busy minus the gateway and the app) and of the load generator's (busy minus this process).
  const noiseBetween = (from, to) => {
    const busy = pct(from, to, 'busy')
    return busy === undefined ? undefined : Math.max(0, busy - (pct(from, to, 'cpu') ?? 0) - (pct(from, to, 'appCpu') ?? 0))
  }
  const lgNoiseBetween = (from, to) => {
    const busy = pct(from, to, 'busyLoadgen')
    return busy === undefined ? undefined : Math.max(0, busy - (pct(from, to, 'loadgen') ?? 0))
  }
  // CPU per request in each second, and the curve it gives: steady CPU/request / that second's. Unlike req/s it
  // does not drop when other users take part of either core (the load generator's included), so it is the
  // steadier reading of the process's own warm-up.
  const cpuSteady = ratePerUnit(samples, steadyFrom, period, 'cpu', 'responses', 1e6)
  const usPerReqPerSecond = Array.from({ length: period }, (_x, i) => ratePerUnit(samples, i, i + 1, 'cpu', 'responses', 1e6))
  const cpuFracs = usPerReqPerSecond.map((us) => (us > 0 && cpuSteady > 0 ? cpuSteady / us : undefined))

  // Control: the same load started again on the now warm process: what a load start costs without a cold process.
  let control
  if (S.coldStart.control > 0) {
    await sleep(1000)
    const again = {}
    const c = await runLoad(run.url, tokens, S.coldStart.control, { recordLatency: false, live: again })
    watch.check()
    const cf = fractions(Array.from({ length: S.coldStart.control }, (_x, i) => again.buckets[i] ?? 0), steady)
    control = { fracs: cf, mean: meanOver(cf, 1, Math.min(FIRST, cf.length)), bad: c.result.non2xx + c.result.errors + c.result.timeouts }
  }
  const logs = logSummary(run.child) // before the preflight's request without a token (an audit line at warn)
  await preflight(subject, run, tokens) // after the load, so that nothing warms the process before it
  await stopChild(run.child)
  await sleep(500)
  return {
    variant: v.name,
    readyMs,
    startCpuMs: startCpu === undefined ? undefined : startCpu * 1000,
    buckets,
    steady,
    fracs,
    sustained: sustainedFrom(fracs, { threshold: THRESHOLD, hold: HOLD }),
    firstMean: meanOver(fracs, 1, first),
    cpuFirst: ratePerUnit(samples, 0, first, 'cpu', 'responses', 1e6),
    // The app behind it is the same warm process for every run: its CPU per request tracks the machine's speed
    // (a host that slows the whole VM down does not show in /proc/stat as other load).
    appCpuFirst: ratePerUnit(samples, 0, first, 'appCpu', 'responses', 1e6),
    appCpuSteady: ratePerUnit(samples, steadyFrom, period, 'appCpu', 'responses', 1e6),
    cpuSteady,
    cpuFracs,
    cpuSustained: sustainedFrom(cpuFracs, { threshold: THRESHOLD, hold: HOLD }),
    cpuFirstMean: meanOver(cpuFracs, 1, first),
    noiseFirst: noiseBetween(0, first),
    noiseSteady: noiseBetween(steadyFrom, period),
    noise: noiseBetween(0, period),
    lgNoiseFirst: lgNoiseBetween(0, first),
    lgNoise: lgNoiseBetween(0, period),
    loadgenFirst: pct(0, first, 'loadgen'),
    // Per second, the first ten: the gateway's share of its core, and its CPU per request.
    cpuPctPerSecond: Array.from({ length: Math.min(10, period) }, (_x, i) => pct(i, i + 1, 'cpu')),
    usPerReqPerSecond: usPerReqPerSecond.slice(0, 10),
    appUsPerReqPerSecond: Array.from({ length: Math.min(10, period) }, (_x, i) => ratePerUnit(samples, i, i + 1, 'appCpu', 'responses', 1e6)),
    control,
    bad: result.non2xx + result.errors + result.timeouts + (control?.bad ?? 0),
    statusCodes: Object.fromEntries(Object.entries(result.statusCodeStats).map(([k, x]) => [k, x.count])),
    logs
  }
}

/**
 * Every second from the load's start (self-correcting timer): responses so far, CPU seconds of the gateway and of
 * the app, busy seconds of the subject core (or the machine) and of the load generator's core, this process's CPU. The nearest samples bound the
 * windows of the CPU and other-load figures.
 */
function startSampler (run, ctx, live, samples) {
  const core = ctx.pin.applied ? ctx.pin.subjectCpu : undefined
  const lgCore = ctx.pin.applied ? ctx.pin.loadgenCpu : undefined
  const take = () => {
    const lg = process.cpuUsage()
    samples.push({
      t: (performance.now() - live.t0) / 1000,
      responses: live.responses,
      cpu: cpuSeconds(run.pid),
      appCpu: cpuSeconds(ctx.app.pid),
      busy: busySeconds(core),
      busyLoadgen: lgCore === undefined ? undefined : busySeconds(lgCore),
      loadgen: (lg.user + lg.system) / 1e6
    })
  }
  let timer
  const next = () => {
    const due = live.t0 + samples.length * 1000
    timer = setTimeout(() => { take(); next() }, Math.max(0, due - performance.now()))
  }
  // runLoad sets live.t0 synchronously when it starts; the first sample is taken on the next turn (~t = 0).
  timer = setTimeout(() => { take(); next() }, 0)
  return { stop: () => clearTimeout(timer) }
}

/** Per variant: per-second median over rounds, its time to THRESHOLD, and medians of the figures. */
function aggregate (variants, runs) {
  return variants.map((v) => {
    const rs = runs.filter((r) => r.variant === v.name)
    const fracs = medianCurve(rs.map((r) => r.fracs))
    const cpuFracs = medianCurve(rs.map((r) => r.cpuFracs))
    const worst = (f) => Math.max(...rs.map((r) => f(r) ?? NaN).filter(Number.isFinite))
    const med = (f) => median(rs.map(f))
    return {
      name: v.name,
      title: v.title,
      rounds: rs.length,
      fracs,
      curve: curveSeconds(fracs.length).map((s) => fracs[s - 1]),
      steady: med((r) => r.steady),
      sustained: sustainedFrom(fracs, { threshold: THRESHOLD, hold: HOLD }),
      sustainedPerRound: rs.map((r) => r.sustained),
      firstMean: meanOver(fracs, 1, Math.min(FIRST, fracs.length)),
      cpuFracs,
      cpuSustained: sustainedFrom(cpuFracs, { threshold: THRESHOLD, hold: HOLD }),
      cpuFirstMean: meanOver(cpuFracs, 1, Math.min(FIRST, cpuFracs.length)),
      readyMs: med((r) => r.readyMs),
      startCpuMs: med((r) => r.startCpuMs),
      cpuFirst: med((r) => r.cpuFirst),
      cpuSteady: med((r) => r.cpuSteady),
      appCpuFirst: med((r) => r.appCpuFirst),
      appCpuSteady: med((r) => r.appCpuSteady),
      noiseFirst: worst((r) => r.noiseFirst),
      noiseSteady: worst((r) => r.noiseSteady),
      noise: worst((r) => r.noise),
      lgNoiseFirst: worst((r) => r.lgNoiseFirst),
      lgNoise: worst((r) => r.lgNoise),
      loadgenFirst: med((r) => r.loadgenFirst),
      control: rs.some((r) => r.control)
        ? { s1: med((r) => r.control?.fracs[0]), mean: med((r) => r.control?.mean) }
        : undefined,
      bad: rs.reduce((n, r) => n + r.bad, 0),
      logs: rs.map((r) => r.logs).filter(Boolean).join('; ')
    }
  })
}
