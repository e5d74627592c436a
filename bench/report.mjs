// The report of `npm run bench`: one markdown table per part, the notes under
// each, the warnings, and bench/results/latest.md (also printed to the console).
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { banner, fmt, fmtNoise, fmtReasons, median } from './lib/format.mjs'
import { logSummary } from './lib/probes.mjs'
import { REQUEST_PATH, ROOT } from './lib/setup.mjs'
import { FIRST as FIRST_WINDOW, HOLD, THRESHOLD } from './phases/cold-start.mjs'
import { BASELINE, RESULTS_FILE, S, WS_BASELINE, WS_PATH } from './settings.mjs'
import { curveSeconds } from './lib/curve.mjs'

/**
 * Prints the tables, warnings and notes, and writes RESULTS_FILE. `run` holds
 * each part's result (undefined when it did not run) and the run's facts
 * (pinning, build, versions, issuer stats, run time, the children whose logs
 * are summarised). Returns true when a check failed (exit code 1).
 */
export function report (run) {
  const { warnings, notes, failed } = checks(run)
  const logs = logNotes(run)
  if (logs) notes.push(logs)
  const console_ = sectionsText(run)
  console.log(`\n${console_}\n`)
  console.log(`run time ${run.elapsed.toFixed(0)} s`)
  for (const w of warnings) console.log(banner(w))
  for (const n of notes) console.log(`note: ${n}`)
  mkdirSync(path.dirname(RESULTS_FILE), { recursive: true })
  writeFileSync(RESULTS_FILE, resultsFile(run, console_, warnings, notes))
  console.log(`wrote ${path.relative(process.cwd(), RESULTS_FILE)}`)
  return failed
}

/** Warnings (loud) and notes from what the parts measured; `failed` when a result is invalid. */
function checks (run) {
  const { subjects, http, fixed, down, wsEcho, wsMem, cold, pin } = run
  const warnings = []
  const notes = []
  let failed = false
  if (http) {
    for (const r of http.rows) {
      if (r.bad > 0) { failed = true; warnings.push(`${r.name}: ${r.bad} non-2xx responses / socket errors / timeouts in measured rounds: THESE NUMBERS ARE INVALID (see the per-round status codes)`) }
      if (r.warmupBad > 0) warnings.push(`${r.name}: ${r.warmupBad} non-2xx responses / errors during warm-up`)
      if (r.loadgen !== undefined && r.loadgen > 90) warnings.push(`${r.name}: the load generator used ${fmt.pct(r.loadgen)} of its CPU: its req/s may be limited by autocannon, not by the subject (CPU µs/req is still valid)`)
    }
    if (subjects.every((s) => s.name !== BASELINE)) warnings.push(`the baseline (${BASELINE}) was not run: no HTTP ratios`)
  }
  for (const r of fixed ?? []) {
    if (r.bad > 0) { failed = true; warnings.push(`fixed rate ${r.name}: ${r.bad} non-2xx responses / errors: THESE NUMBERS ARE INVALID`) }
    if (r.late > 50) warnings.push(`fixed rate ${r.name}: the sender fell ${fmt.ms(r.late)} ms behind its schedule at least once (load generator busy): latencies include it`)
  }
  if (down) {
    for (const m of down.phases) {
      const bad = m.non2xx + m.errors + m.timeouts
      if (bad > 0) {
        failed = true
        warnings.push(`Redis down, ${m.label}: ${m.non2xx} non-2xx and ${m.errors + m.timeouts} errors/timeouts with RATE_LIMIT_ON_STORE_ERROR=open (status codes ${JSON.stringify(m.statusCodes)}): every answer should have been 200`)
      }
    }
  }
  if (wsEcho) {
    for (const r of wsEcho.rows) {
      if (r.bad > 0) { failed = true; warnings.push(`WebSocket echo ${r.name}: ${r.bad} connection errors or mismatched echoes (see the per-round lines)`) }
      if (r.loadgen !== undefined && r.loadgen > 90) warnings.push(`WebSocket echo ${r.name}: the load generator used ${fmt.pct(r.loadgen)} of its CPU: round trips/s may be limited by the client, not by the subject`)
      else if (r.loadgen !== undefined && r.loadgen > 75) notes.push(`WebSocket echo ${r.name}: the load generator used a median ${fmt.pct(r.loadgen)} of its core, close to its limit: ${r.name}'s round trips/s is rather a lower bound (CPU per round trip is unaffected)`)
    }
  }
  if (wsMem) {
    for (const r of wsMem) {
      const bad = [...r.failures.values(), ...r.closedEarly.values()].reduce((a, b) => a + b, 0)
      if (bad > 0) { failed = true; warnings.push(`WebSocket memory ${r.name}: ${r.failures.size ? `failed to open: ${fmtReasons(r.failures)}` : ''}${r.closedEarly.size ? ` closed early: ${fmtReasons(r.closedEarly)}` : ''}`) }
      if (r.gauge !== undefined && r.gauge !== r.stillOpen) warnings.push(`WebSocket memory ${r.name}: the gateway's resonance_ws_connections gauge said ${r.gauge} while ${r.stillOpen} client connections were open`)
      if (r.gaugeAfterClose !== undefined && r.gaugeAfterClose !== 0) warnings.push(`WebSocket memory ${r.name}: resonance_ws_connections still ${r.gaugeAfterClose} one second after every client closed (sessions not released?)`)
      if (r.after.gc === false || r.before.gc === false) notes.push(`WebSocket memory ${r.name}: no GC before a reading (${r.after.probe ?? 'probe without --expose-gc'}); RSS is without a forced GC`)
    }
  }
  const first = firstSeconds()
  for (const r of cold?.rows ?? []) {
    if (r.bad > 0) { failed = true; warnings.push(`cold start ${r.name}: ${r.bad} non-2xx responses / socket errors / timeouts: THESE NUMBERS ARE INVALID`) }
    if (r.loadgenFirst !== undefined && r.loadgenFirst > 90) warnings.push(`cold start ${r.name}: the load generator used ${fmt.pct(r.loadgenFirst)} of its core in the first ${first} s: the curve may be the load generator's, not the gateway's`)
    const loud = (first, whole) => first > 15 || whole > 10
    if (loud(r.noiseFirst, r.noise) || loud(r.lgNoiseFirst, r.lgNoise)) {
      warnings.push(`cold start ${r.name}: other processes used up to ${fmt.pct(r.noiseFirst)} of ${pin.applied ? 'the subject core' : 'a core'} in the first ${first} s ` +
        `(${fmt.pct(r.noise)} over the whole period)${pin.applied ? ` and ${fmt.pct(r.lgNoiseFirst)} of the load generator's (${fmt.pct(r.lgNoise)})` : ''}: ` +
        'the req/s curve is partly the machine\'s noise; the CPU/req curve holds up better')
    }
  }
  const allMeasurements = [...(http?.results ?? []), ...(wsEcho?.results ?? [])]
  const noisy = median(allMeasurements.map((m) => m.noise.subjectCore ?? m.noise.machine))
  if (noisy !== undefined && noisy > 10) {
    warnings.push(`other processes used a median ${fmt.pct(noisy)} of ${pin.applied ? 'the subject core' : 'a core'} during the measurements (the machine was shared): ` +
      'req/s and latencies are pessimistic and noisy; CPU µs/req holds up better')
  }
  if (!pin.applied) warnings.push(`CPU pinning not applied (${pin.reason})`)
  return { warnings, notes, failed }
}

/** What the subjects logged during the run, summarised per process, or undefined when none logged. */
function logNotes (run) {
  const { http, wsEcho, wsMem, cold, children } = run
  const logLines = []
  for (const [name, proc] of [['issuer', { child: children.issuer }], ['app', { child: children.app }], ...(http ? [...children.httpRuns] : []), ...(wsEcho ? [...wsEcho.runs].map(([n, r]) => [`ws ${n}`, r]) : [])]) {
    if (proc.child?.lines.length) logLines.push(`- ${name}: ${proc.child.lines.length} stdout lines during the run: ${logSummary(proc.child).slice(0, 400)}`)
  }
  for (const r of wsMem ?? []) if (r.logs) logLines.push(`- ws memory ${r.name}: ${r.logs.slice(0, 400)}`)
  for (const r of cold?.rows ?? []) if (r.logs) logLines.push(`- cold start ${r.name}: ${r.logs.slice(0, 400)}`)
  return logLines.length ? 'subjects logged during the run (at LOG_LEVEL=warn a healthy gateway is silent):\n' + logLines.join('\n') : undefined
}

/** The tables with their explanations, one section per part that ran: the console output and the top of the results file. */
function sectionsText (run) {
  const { http, fixed, down, wsEcho, wsMem, cold } = run
  const sections = []
  if (http) {
    sections.push(`## HTTP: one request through each subject\n\n${httpTable(http.rows)}\n\n` +
      `Medians of ${S.rounds} interleaved rounds; ${S.duration} s measured per round after ${S.warmup} s warm-up; ${S.connections} connections (closed loop). ` +
      'Ratios: per round against the plain proxy (and HAProxy) of the same round, then the median; "vs HAProxy" columns are "higher is better" for req/s and p99 (HAProxy p99 / row p99), "lower is better" for CPU/req.\n' +
      httpNotes(http.rows).map((n) => `\n- ${n}`).join(''))
  }
  if (fixed) {
    sections.push(`## Fixed rate: the latency each subject adds at ${fmt.int(S.rate.rps)} req/s (open loop)\n\n${rateTable(fixed)}\n\n` +
      `Open loop (bench/lib/open-loop.mjs): one request every ${fmt.n2(1000 / S.rate.rps)} ms whatever the answers, up to 256 connections, latency measured from the moment each request was due ` +
      `(a stall shows in every request scheduled during it). ${S.rate.duration} s per subject and round after ${S.rate.warmup} s at the same rate (discarded), ${S.rate.rounds} interleaved rounds, subjects already warm from the HTTP table; ` +
      'percentiles over all rounds\' requests together. "added" = the row\'s percentile minus direct\'s: what the proxy adds, with the scheduler\'s ~1 ms tick and the app cancelled out. ' +
      'CPU µs/req here is at a light load (the core mostly idle), so it is higher than under saturation (fewer requests share each wake-up). ' +
      '"other load": busy time on the subject core from anything but the subject, the app and its Redis (other users of the machine), in % of the core, worst round: a tail in a round with high other load is the machine\'s, not the subject\'s.')
  }
  if (down) {
    sections.push(`## Redis down: gateway-redis while its Redis is up, hung, dead\n\n${redisDownTable(down.phases)}\n\n` +
      `${down.reused ? 'The gateway-redis process of the HTTP table (already warm), after another' : 'A fresh gateway with REDIS_URL to its own private redis-server, after'} ${down.warmup} s of load; ` +
      `RATE_LIMIT_ON_STORE_ERROR=open. ${S.connections} connections closed loop, ${S.redisDown.duration} s per row, back to back, ` +
      'each row starting right after the SIGSTOP / SIGKILL of redis-server (no settling). "store errors": increase of resonance_rate_limit_store_errors_total during the row. ' +
      `"longest gap": the longest time without any response (every connection stuck). "other load": as in the per-round tables (subject core / load-generator core).\n\n- ${down.recovery}\n- gateway log lines: ${down.logs || 'none'}`)
  }
  if (wsEcho) {
    sections.push(`## WebSocket echo: round trips through each path\n\n${wsEchoTable(wsEcho.rows)}\n\n` +
      `Medians of ${S.rounds} interleaved rounds; ${S.ws.echoConnections} connections, each sending a ${S.ws.messageBytes}-byte text message and waiting for its echo before the next (closed loop); ` +
      `${S.ws.duration} s measured per round after ${S.ws.warmup} s warm-up. Ratios: per round against direct (or the plain proxy), then the median; targets for the gateway: ≥ 0.7× direct (issue 13; earlier ≥ 0.5×), and the tcp-pipe row is the floor of any Node relay. ` +
      '"round trips per CPU-second vs direct" = (app CPU/round trip direct) / (proxy + app CPU/round trip through the path): the round-trips/s ratio the paths would show with the subject core to themselves; ' +
      'unlike round trips/s it does not depend on how much of the core other users took during each round.')
  }
  if (wsMem) {
    sections.push(`## WebSocket memory: idle connections held open\n\n${wsMemTable(wsMem)}\n\n` +
      `Fresh processes per target. Warm-up: ${S.ws.memWarmup} connections opened and closed (users of their own), then ${S.ws.settle} s settle, a forced GC (--expose-gc, bench/lib/mem-probe.mjs) and the "before" reading (VmRSS); ` +
      `then ${S.ws.connections} connections opened ${S.ws.batch} at a time (each with one echo, then idle; through the gateway ${Math.min(S.ws.connections, S.tokens)} users, ` +
      `${Math.ceil(S.ws.connections / S.tokens)} connections each, so the figure includes their per-user state), ${S.ws.settle} s settle, GC, "with connections" reading. ` +
      'KiB/connection = RSS difference / connections (target for the gateway: ≤ 10 KiB, issue 13; earlier ≤ 20 KiB). The JS heap column (heapUsed after GC) is the steadier figure; RSS also counts native memory (sockets, buffers) and heap pages V8 keeps after a GC. ' +
      '"JS heap still held after closing": heapUsed after every client closed (GC; read each second from 1 s on until it stops shrinking, at most 6 s) minus "before", per connection: state that outlives the connections ' +
      '(per-user caches and counters by design; a figure close to the open one would be a leak).' +
      wsMem.filter((r) => r.upstreamKibPerConn !== undefined).map((r) => `\n\n- ${r.name}: the app behind it grew by ${fmt.kib(r.upstreamKibPerConn)} KiB per connection (its side of the upstream connections); ` +
        `${r.perSub ? `${r.perSub} connections per sub; ` : ''}gateway gauge resonance_ws_connections ${r.gauge ?? 'n/a'} while open, ${r.gaugeAfterClose ?? 'n/a'} one second after closing; ` +
        `"after closing" read ${r.closeSeconds.toFixed(1)} s after the clients started closing.`).join(''))
  }
  if (cold) {
    const first = firstSeconds()
    const rounds = S.coldStart.rounds
    sections.push(`## Cold start: a fresh gateway under load from its first second\n\n${coldCurveTable(cold.rows)}\n\n${coldDetailTable(cold.rows)}\n\n` +
      `Per variant${rounds > 1 ? ` and round (${rounds} interleaved rounds, order rotated)` : ''}: a fresh gateway process with the settings of the \`gateway\` row (in-process limit store, same app, pinned to the subject core), ` +
      `plus the variant's node flags / env. As soon as its admin /readyz answers 200 (polled every 100 ms), the HTTP table's closed loop starts (${S.connections} new connections, the same ${S.tokens} RS256 tokens, so the verified-token cache starts empty) ` +
      `for ${S.coldStart.seconds} s, with the responses counted per second from the load's start (s1 = [0 s, 1 s)). ` +
      `Each second is shown as a fraction of the same run's **steady** rate = the median of its last ${Math.max(1, Math.floor(S.coldStart.seconds / 3))} seconds${rounds > 1 ? '; with several rounds, the per-second median of the rounds\' fractions' : ''}. ` +
      `"≥${THRESHOLD * 100}% from": the first second at ≥ ${THRESHOLD * 100}% of steady whose next ${HOLD} seconds are too. "mean s1–${first}": the mean fraction of the first ${first} s. ` +
      '"ready": spawn to /readyz 200; "CPU to ready": the gateway\'s utime+stime by then (start-up: module loading, config, JWKS fetch). ' +
      `CPU µs/req: the gateway's utime+stime (sampled every second) / responses, in the first ${first} s and in the steady window. ` +
      'The **CPU/req** curve is the steady window\'s CPU µs/req divided by each second\'s: the share of its steady rate the gateway could serve with the CPU each request took then. ' +
      'It does not drop when other users take part of the subject core or of the load generator\'s (a req/s dip with a flat CPU/req curve is the machine, not the gateway). ' +
      '"app CPU µs/req": the app behind the gateway, the same warm process in every run: its steady figure tracks the machine\'s own speed from run to run (a host that slows the whole VM down does not show in /proc/stat as other load); in the first seconds it is higher too (new upstream connections, fewer requests per event-loop turn). ' +
      `"warm restart"${S.coldStart.control > 0 ? `: 1 s after the period the same load is started again (${S.coldStart.control} s) on the now warm process; its s1 and mean s1–${Math.min(first, S.coldStart.control)} against the same steady rate: what starting a load costs (new connections, the load generator ramping up) without a cold process, so cold minus warm is the process's own warm-up` : ' (off: BENCH_COLD_START_CONTROL=0)'}. ` +
      `"other load": busy time of the subject core minus the gateway and the app, and of the load generator's core minus this process, in % of the core (worst round), in the first ${first} s / the steady window / the whole period. ` +
      `The app (and this load generator) got ${cold.primed} s of the same load through a throwaway gateway before the first variant, so every variant meets them warm.`)
  }
  return sections.join('\n\n')
}

/** bench/results/latest.md: the sections, warnings, notes, subjects, machine and settings, per-round details. */
function resultsFile (run, console_, warnings, notes) {
  const { http, wsEcho, wsMem, cold, pin, pinText, nproc, build, redisVersion, issuerStats, elapsed } = run
  const cpus = os.cpus()
  const titles = (list, label) => (list.length ? `- ${label}: ${list.map((r) => `**${r.name}**: ${r.title}`).join('; ')}\n` : '')
  const httpDetails = http
    ? http.results.map((m) => `| ${m.round} | ${m.subject} | ${fmt.int(m.rps)} | ${fmt.int(m.total)} | ${fmt.ms(m.p50)} | ${fmt.ms(m.p99)} | ${fmt.us(m.cpuUsPerReq)} | ${fmt.pct(m.cpuPct)} | ${fmt.mib(m.rssKiB)} | ` +
      `${m.others.map((o) => `${o.label} ${fmt.us(o.usPerReq)}`).join(', ') || '–'} | ${fmt.pct(m.loadgenCpuPct)} | ${fmtNoise(m.noise)} | ${Object.entries(m.statusCodes).map(([k, v]) => `${k}: ${v}`).join(', ')}${m.errors || m.timeouts ? `; errors ${m.errors}, timeouts ${m.timeouts}` : ''} |`)
    : []
  const wsDetails = wsEcho
    ? wsEcho.results.map((m) => `| ${m.round} | ${m.subject} | ${fmt.int(m.rtps)} | ${fmt.int(m.total)} | ${fmt.ms(m.p50)} | ${fmt.ms(m.p99)} | ${fmt.us(m.cpuUsPerRt)} | ${fmt.pct(m.cpuPct)} | ` +
      `${m.others.map((o) => `${o.label} ${fmt.us(o.usPerReq)}`).join(', ') || '–'} | ${fmt.pct(m.loadgenCpuPct)} | ${fmtNoise(m.noise)} | ${m.errors.size ? fmtReasons(m.errors) : '0'} |`)
    : []
  return `# Gateway benchmark: latest run

${console_}
${warnings.length ? '\n' + warnings.map((w) => `> **Warning:** ${w.replace(/\n/g, '\n> ')}`).join('\n>\n') + '\n' : ''}${notes.length ? '\n' + notes.map((n) => `Note: ${n}`).join('\n\n') + '\n' : ''}
## Subjects

${titles(http?.rows ?? [], 'HTTP')}${titles(wsEcho?.rows ?? [], 'WebSocket echo')}${titles(wsMem ?? [], 'WebSocket memory')}${titles(cold?.rows ?? [], 'cold start')}
## Machine and settings

- date: ${new Date().toISOString()}
- CPU: ${cpus[0]?.model ?? 'unknown'}; nproc ${nproc}; load average at the end ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}
- OS: ${os.type()} ${os.release()}; node ${process.version}${redisVersion ? `; ${redisVersion.replace(/ sha=.*$/, '')}` : ''}
- pinning: ${pinText}
- gateway: dist/ built from ${build.git}, dist/server.js from ${build.at}; every gateway of the run started from a copy of it taken at the start
- packages: fastify ${version('fastify')}, @fastify/http-proxy ${version('@fastify/http-proxy')}, @fastify/jwt ${version('@fastify/jwt')}, @fastify/rate-limit ${version('@fastify/rate-limit')}, ioredis ${version('ioredis')}, ws ${version('ws')}, autocannon ${version('autocannon')}
- HTTP load: autocannon, ${S.connections} connections, pipelining 1, GET ${REQUEST_PATH}<n> with ${S.tokens} distinct RS256 tokens (distinct subs) dealt out to the connections, ${Math.ceil(S.tokens / S.connections)} per connection${http ? `; app answer ${http.bodyBytes} bytes of JSON` : ''}
- HTTP per round and subject: ${S.warmup} s warm-up, ${S.duration} s measured; ${S.prime} s priming per subject before round 1
- WebSocket: ws ${version('ws')} clients in the runner, permessage-deflate off, path ${WS_PATH}; gateway token in \`?access_token=\`, each echo connection its own sub
- issuer fetches during the whole run: ${issuerStats}
- run time: ${elapsed.toFixed(0)} s
${http
  ? `
## Per round: HTTP

CPU µs/req: utime+stime of the process (all threads) during the measured ${S.duration} s / responses. "CPU" = that process's share of one core; "others" = the app process behind a proxy (and redis-server for Redis rows); "other load" = busy time from /proc/stat (incl. steal) minus the bench's own processes, in % of one core${pin.applied ? ', on the subject core / the load-generator core' : ', whole machine'}: the noise from whatever else ran on the machine.

| round | subject | req/s | responses | p50 ms | p99 ms | CPU µs/req | CPU | RSS MiB after | others µs/req | load generator CPU | other load | status codes |
|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|
${httpDetails.join('\n')}
`
  : ''}${wsEcho
  ? `
## Per round: WebSocket echo

CPU µs/rt: utime+stime of the subject process (for direct: the app) per round trip during the measured ${S.ws.duration} s.

| round | path | round trips/s | round trips | p50 ms | p99 ms | CPU µs/rt | CPU | others µs/rt | load generator CPU | other load | errors |
|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|
${wsDetails.join('\n')}
`
  : ''}${cold ? coldDetails(cold) : ''}`
}

function version (pkg) {
  try {
    return JSON.parse(readFileSync(path.join(ROOT, 'node_modules', pkg, 'package.json'), 'utf8')).version
  } catch {
    return '?'
  }
}

// --------------------------------------------------------------- tables --

function httpTable (rows) {
  const peer = rows.some((r) => r.peer !== undefined)
  const lines = [
    '| subject | req/s | p50 ms | p99 ms | CPU µs/req (subject process) | req/s vs plain proxy | CPU/req vs plain proxy |' +
      (peer ? ' req/s vs HAProxy | CPU/req vs HAProxy | p99 vs HAProxy (HAProxy p99 / row p99) |' : '') + ' non-2xx |',
    '|---|---:|---:|---:|---:|---:|---:|' + (peer ? '---:|---:|---:|' : '') + '---:|'
  ]
  for (const r of rows) {
    lines.push(`| ${r.name} | ${fmt.int(r.rps)} | ${fmt.ms(r.p50)} | ${fmt.ms(r.p99)} | ${fmt.us(r.cpu)} | ${fmt.ratio(r.rpsRatio)} | ${fmt.ratio(r.cpuRatio)} |` +
      (peer ? ` ${fmt.ratio(r.peer?.rps)} | ${fmt.ratio(r.peer?.cpu)} | ${fmt.ratio(r.peer?.p99)} |` : '') +
      ` ${r.bad === 0 ? '0' : `**${r.bad}**`} |`)
  }
  return lines.join('\n')
}

/** Lines under the HTTP table: Redis's own CPU per request (not in the subject column) and commands per request. */
function httpNotes (rows) {
  const notes = []
  for (const r of rows) {
    const redis = r.others.find((o) => o.label === 'redis')
    if (redis) {
      notes.push(`${r.name}: plus **${fmt.us(redis.usPerReq)} µs/req in redis-server** (median; not in the subject column), ` +
        `i.e. ${fmt.us((r.cpu ?? NaN) + (redis.usPerReq ?? NaN))} µs/req gateway + Redis; Redis calls per request (INFO commandstats, Lua-internal calls included): ${r.redisCmdsPerReq ? Object.entries(r.redisCmdsPerReq).filter(([, v]) => v >= 0.005).map(([k, v]) => `${k} ${fmt.n2(v)}`).join(', ') : 'n/a'}. ` +
        'redis-server shares the subject core, so its CPU also lowers the row\'s req/s.')
    }
  }
  const lim = rows.find((r) => r.name === 'gateway')
  const nolim = rows.find((r) => r.name === 'gateway-nolimit')
  const red = rows.find((r) => r.name === 'gateway-redis')
  if (nolim?.cpu !== undefined) {
    const d = (r) => (r?.cpu === undefined ? undefined : r.cpu - nolim.cpu)
    const range = (r) => (r === undefined ? [] : [`${r.name} ${fmt.us(r.cpuRange[0])}–${fmt.us(r.cpuRange[1])}`])
    notes.push(`Limit cost per request vs gateway-nolimit (gateway process only, difference of medians): in-process store ${d(lim) === undefined ? 'n/a' : `${d(lim) >= 0 ? '+' : ''}${fmt.us(d(lim))} µs`}, ` +
      `Redis store ${d(red) === undefined ? 'n/a' : `${d(red) >= 0 ? '+' : ''}${fmt.us(d(red))} µs`} (+ redis-server's own CPU above). ` +
      `Compare with the spread over rounds, CPU µs/req min–max: ${[nolim, lim, red].flatMap(range).join(', ')}: a difference smaller than the spread is not resolved by this run.`)
  }
  return notes
}

function rateTable (rows) {
  const lines = [
    '| subject | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | added p50 ms (vs direct) | added p99 ms (vs direct) | CPU µs/req | other load (worst round) | non-2xx / errors |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    const added = (x) => (r.name === 'direct' || x === undefined ? '–' : `${x >= 0 ? '+' : ''}${fmt.ms(x)}`)
    lines.push(`| ${r.name} | ${fmt.ms(r.p50)} | ${fmt.ms(r.p90)} | ${fmt.ms(r.p99)} | ${fmt.ms(r.p999)} | ${fmt.ms(r.max)} | ${added(r.added50)} | ${added(r.added99)} | ` +
      `${fmt.us(r.cpu)} | ${fmt.pct(r.noise)} | ${r.bad === 0 ? '0' : `**${r.bad}**`} |`)
  }
  return lines.join('\n')
}

function redisDownTable (phases) {
  const lines = [
    '| Redis | req/s | p50 ms | p99 ms | max ms | responses ≥ 250 ms | longest gap ms | CPU µs/req (gateway) | store errors | /readyz after | non-2xx | errors/timeouts | other load |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const m of phases) {
    lines.push(`| ${m.label} | ${fmt.int(m.rps)} | ${fmt.ms(m.p50)} | ${fmt.ms(m.p99)} | ${fmt.ms(m.max)} | ${fmt.int(m.slow)} | ${fmt.ms(m.maxGap)} | ${fmt.us(m.cpuUsPerReq)} | ` +
      `${fmt.int(m.storeErrors)} | ${m.readyz} | ${m.non2xx === 0 ? '0' : `**${m.non2xx}**`} | ${m.errors + m.timeouts === 0 ? '0' : `**${m.errors + m.timeouts}**`} | ${fmtNoise(m.noise)} |`)
  }
  return lines.join('\n')
}

function wsEchoTable (rows) {
  const lines = [
    '| path | round trips/s | p50 ms | p99 ms | CPU µs/round trip (proxy process) | app CPU µs/round trip | round trips/s vs direct | round trips per CPU-second vs direct | proxy CPU/round trip vs plain proxy | errors |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    lines.push(`| ${r.name} | ${fmt.int(r.rtps)} | ${fmt.ms(r.p50)} | ${fmt.ms(r.p99)} | ${r.name === WS_BASELINE ? '–' : fmt.us(r.cpu)}${r.redis !== undefined ? ` (+ Redis ${fmt.us(r.redis)})` : ''} | ` +
      `${fmt.us(r.app)} | ${fmt.ratio(r.ratio)} | ${fmt.ratio(r.perCpuVsDirect)} | ${r.name === WS_BASELINE ? '–' : fmt.ratio(r.cpuVsProxy)} | ${r.bad === 0 ? '0' : `**${r.bad}**`} |`)
  }
  return lines.join('\n')
}

function wsMemTable (rows) {
  const lines = [
    '| target | connections open | RSS before MiB | RSS with connections MiB | KiB/connection (RSS) | JS heap KiB/connection (after GC) | CPU µs per open | RSS after closing MiB | JS heap still held after closing, KiB/connection | failed / closed early |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    const bad = [...r.failures.values(), ...r.closedEarly.values()].reduce((a, b) => a + b, 0)
    lines.push(`| ${r.name} | ${fmt.int(r.stillOpen)} | ${fmt.mib(r.before.rssKiB)} | ${fmt.mib(r.after.rssKiB)} | **${fmt.kib(r.kibPerConn)}** | ${fmt.kib(r.heapKibPerConn)} | ` +
      `${fmt.us(r.cpuUsPerOpen)} | ${fmt.mib(r.afterClose.rssKiB)} | ${fmt.kib(r.heapRetainedKibPerConn)} | ${bad === 0 ? '0' : `**${bad}**`} |`)
  }
  return lines.join('\n')
}

function coldCurveTable (rows) {
  const first = firstSeconds()
  const secs = curveSeconds(Math.max(...rows.map((r) => r.fracs.length)))
  const lines = [
    `| variant | curve of | steady | ${secs.map((x) => `s${x}`).join(' | ')} | ≥${THRESHOLD * 100}% from | mean s1–${first} |`,
    `|---|---|---:|${secs.map(() => '---:|').join('')}---:|---:|`
  ]
  const from = (x) => (x === undefined ? 'never' : `s${x}`)
  for (const r of rows) {
    const perRound = r.rounds > 1 ? ` (rounds: ${r.sustainedPerRound.map(from).join(', ')})` : ''
    lines.push(`| ${r.name} | req/s | ${fmt.int(r.steady)} req/s | ${secs.map((x) => fmt.n2(r.fracs[x - 1])).join(' | ')} | **${from(r.sustained)}**${perRound} | **${fmt.n2(r.firstMean)}** |`)
    lines.push(`| ${r.name} | CPU/req | ${fmt.us(r.cpuSteady)} µs/req | ${secs.map((x) => fmt.n2(r.cpuFracs[x - 1])).join(' | ')} | ${from(r.cpuSustained)} | ${fmt.n2(r.cpuFirstMean)} |`)
  }
  return lines.join('\n')
}

function coldDetailTable (rows) {
  const first = firstSeconds()
  const lines = [
    `| variant | how it is started | ready ms | CPU ms to ready | CPU µs/req s1–${first} | CPU µs/req steady | s1–${first} / steady | app CPU µs/req s1–${first} / steady | warm restart: s1, mean | other load, subject core: s1–${first} / steady / whole | other load, load-generator core: s1–${first} / whole | non-2xx / errors |`,
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
  ]
  for (const r of rows) {
    lines.push(`| ${r.name} | ${r.title} | ${fmt.int(r.readyMs)} | ${fmt.int(r.startCpuMs)} | ${fmt.us(r.cpuFirst)} | ${fmt.us(r.cpuSteady)} | ${fmt.ratio(r.cpuFirst / r.cpuSteady)} | ` +
      `${fmt.us(r.appCpuFirst)} / ${fmt.us(r.appCpuSteady)} | ` +
      `${r.control ? `${fmt.n2(r.control.s1)}, ${fmt.n2(r.control.mean)}` : '–'} | ${fmt.pct(r.noiseFirst)} / ${fmt.pct(r.noiseSteady)} / ${fmt.pct(r.noise)} | ` +
      `${fmt.pct(r.lgNoiseFirst)} / ${fmt.pct(r.lgNoise)} | ${r.bad === 0 ? '0' : `**${r.bad}**`} |`)
  }
  return lines.join('\n')
}

/** The first window's length: FIRST_WINDOW (5) seconds, or the whole period when it is shorter. */
function firstSeconds () { return Math.min(FIRST_WINDOW, S.coldStart.seconds) }

/** The results file's per-run section: every second's responses, and the gateway's CPU in its first 10 s. */
function coldDetails (cold) {
  const first = firstSeconds()
  const lines = cold.runs.map((r) => `${r.variant} round ${r.round}: steady ${fmt.int(r.steady)} req/s; responses per second: ${r.buckets.join(' ')}\n` +
    `  gateway CPU % of its core s1..s${r.cpuPctPerSecond.length}: ${r.cpuPctPerSecond.map(fmt.us).join(' ')}; CPU µs/req: ${r.usPerReqPerSecond.map(fmt.us).join(' ')}; ` +
    `app CPU µs/req: ${r.appUsPerReqPerSecond.map(fmt.us).join(' ')}; ` +
    `load generator s1–${first} ${fmt.pct(r.loadgenFirst)}; status codes ${Object.entries(r.statusCodes).map(([k, v]) => `${k}: ${v}`).join(', ')}` +
    `${r.control ? `; warm restart per second (fractions): ${r.control.fracs.map(fmt.n2).join(' ')}` : ''}`)
  return `
## Per run: cold start

\`\`\`
${lines.join('\n')}
\`\`\`
`
}
