// Part 1, HTTP: every subject started and preflighted, primed, then measured
// once per round (rounds interleaved, order rotated); medians over rounds.
import { fmt, fmtNoise, median } from '../lib/format.mjs'
import { measure, runLoad } from '../lib/load.mjs'
import { BASELINE, PEER, S } from '../settings.mjs'
import { preflight } from './preflight.mjs'

/** Part 1. The subjects stay up (ctx.httpRuns) for the parts after it. Returns { rows, results, bodyBytes }. */
export async function httpPhase (ctx, subjects, tokens, watch) {
  const bodyBytes = await startSubjects(ctx, subjects, tokens, watch)
  if (S.prime > 0) {
    for (const s of subjects) {
      console.log(`priming ${s.name} for ${S.prime} s`)
      await runLoad(ctx.httpRuns.get(s.name).url, tokens, S.prime, { recordLatency: false })
      watch.check()
    }
  }
  const results = await measureRounds(ctx, subjects, tokens, watch)
  return { rows: aggregate(subjects, results), results, bodyBytes }
}

/** Starts each subject into ctx.httpRuns after its preflight; returns the size of the app's answer. */
async function startSubjects (ctx, subjects, tokens, watch) {
  const runs = ctx.httpRuns
  let bodyBytes
  for (const s of subjects) {
    const run = await s.start(ctx)
    bodyBytes = await preflight(s, run, tokens)
    runs.set(s.name, run)
    for (const c of [run.child, ...(run.extraChildren ?? [])]) watch.add(c)
    console.log(`started ${s.name} (pid ${run.pid}${run.redis ? `, redis pid ${run.redis.pid} port ${run.redis.port}` : ''}) at ${run.url}: preflight ok` +
      `${s.auth ? ' (401 without a token, identity forwarded' : ''}${s.limitHeaders === true ? ', limit applied' : s.limitHeaders === false ? ', caller exempt' : ''}${s.auth ? ')' : ''}` +
      `${run.redis ? ', Redis in use' : ''}`)
  }
  return bodyBytes
}

/** Every subject once per round; one result per round and subject. */
async function measureRounds (ctx, subjects, tokens, watch) {
  const runs = ctx.httpRuns
  const results = [] // per round, per subject
  for (let round = 1; round <= S.rounds; round++) {
    // Rotate the order each round so no subject always runs first or last.
    const order = subjects.map((_s, i) => subjects[(i + round - 1) % subjects.length])
    for (const s of order) {
      const m = await measure(s, runs.get(s.name), tokens, S.warmup, ctx.pin)
      watch.check()
      m.round = round
      results.push(m)
      const bad = m.non2xx + m.errors + m.timeouts
      console.log(`round ${round}/${S.rounds} ${s.name.padEnd(16)} ${fmt.int(m.rps).padStart(7)} req/s  p50 ${fmt.ms(m.p50)} ms  p99 ${fmt.ms(m.p99)} ms  ` +
        `${fmt.us(m.cpuUsPerReq)} µs/req (${fmt.pct(m.cpuPct)} CPU)${m.others.filter((o) => o.label !== 'app').map((o) => `  ${o.label} ${fmt.us(o.usPerReq)} µs/req`).join('')}` +
        `  RSS ${fmt.mib(m.rssKiB)} MiB  load generator ${fmt.pct(m.loadgenCpuPct)}  other load ${fmtNoise(m.noise)}${bad ? `  NON-2XX/ERRORS: ${bad}` : ''}`)
    }
  }
  return results
}

/** Medians over rounds; ratios per round (same conditions), then their median. */
function aggregate (subjects, results) {
  const byRound = (name) => results.filter((r) => r.subject === name)
  const baselineRounds = new Map(byRound(BASELINE).map((r) => [r.round, r]))
  const peerRounds = new Map(byRound(PEER).map((r) => [r.round, r]))
  return subjects.map((s) => {
    const rs = byRound(s.name)
    const ratioTo = (base, f) => (base.size === 0
      ? undefined
      : median(rs.map((r) => { const b = base.get(r.round); return b && f(b) ? f(r) / f(b) : undefined })))
    const ratio = (f) => ratioTo(baselineRounds, f)
    return {
      name: s.name,
      title: s.title,
      rps: median(rs.map((r) => r.rps)),
      p50: median(rs.map((r) => r.p50)),
      p99: median(rs.map((r) => r.p99)),
      cpu: median(rs.map((r) => r.cpuUsPerReq)),
      rpsRatio: ratio((r) => r.rps),
      cpuRatio: ratio((r) => r.cpuUsPerReq),
      // Against HAProxy's JWT path, same round: req/s and p99 as "higher is better" (peer p99 / ours).
      peer: peerRounds.size === 0
        ? undefined
        : { rps: ratioTo(peerRounds, (r) => r.rps), cpu: ratioTo(peerRounds, (r) => r.cpuUsPerReq), p99: ratioTo(peerRounds, (r) => 1 / r.p99) },
      bad: rs.reduce((n, r) => n + r.non2xx + r.errors + r.timeouts, 0),
      warmupBad: rs.reduce((n, r) => n + r.warmupBad, 0),
      loadgen: median(rs.map((r) => r.loadgenCpuPct)),
      cpuPct: median(rs.map((r) => r.cpuPct)),
      cpuRange: [Math.min(...rs.map((r) => r.cpuUsPerReq ?? NaN)), Math.max(...rs.map((r) => r.cpuUsPerReq ?? NaN))],
      redisCmdsPerReq: rs.find((r) => r.redisCmdsPerReq !== undefined)
        ? Object.fromEntries([...new Set(rs.flatMap((r) => Object.keys(r.redisCmdsPerReq ?? {})))].map((k) => [k, median(rs.map((r) => r.redisCmdsPerReq?.[k] ?? 0))]))
        : undefined,
      others: [...new Set(rs.flatMap((r) => r.others.map((o) => o.label)))].map((label) => ({
        label, usPerReq: median(rs.map((r) => r.others.find((o) => o.label === label)?.usPerReq))
      }))
    }
  })
}
