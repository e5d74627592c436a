// Part 4, WebSocket memory: memory per idle connection, each target a fresh
// process (or two) started with --expose-gc and lib/mem-probe.mjs.
import { cpuSeconds, stopChild } from '../lib/children.mjs'
import { fmt, fmtReasons } from '../lib/format.mjs'
import { logSummary, memProbe, metricValue, sleep } from '../lib/probes.mjs'
import { closeAll, openIdle } from '../lib/ws-load.mjs'
import { S } from '../settings.mjs'
import { wsPreflight, wsUrlFor } from './preflight.mjs'

/** Part 4. One row per target; each target's processes are stopped after its row. */
export async function wsMemPhase (ctx, targets, tokens, warmTokens, watch) {
  const out = []
  for (const t of targets) out.push(await measureTarget(ctx, t, tokens, warmTokens, watch))
  return out
}

/** Warm-up, "before" reading, BENCH_WS_CONNECTIONS opened, "with connections" reading, then closing (closeAndRead). */
async function measureTarget (ctx, t, tokens, warmTokens, watch) {
  const n = S.ws.connections
  const run = await t.start(ctx)
  await wsPreflight(t, run, tokens, { checkAnon: false })
  for (const c of run.stop) watch.add(c)
  const urlFor = wsUrlFor(run, t.auth, tokens)
  const perSub = t.auth ? Math.ceil(n / tokens.length) : undefined
  console.log(`ws memory: ${t.name} (pid ${run.pid}${run.upstream ? `, upstream app pid ${run.upstream.pid}` : ''}): warm-up ${S.ws.memWarmup} connections, then ${n} connections` +
    `${t.auth ? ` over ${Math.min(n, tokens.length)} subs (${perSub} per sub)` : ''}, ${S.ws.batch} handshakes at a time`)
  // Warm-up: the code paths (JIT), with tokens of their own so that the
  // measured connections' users still bring their per-user state (verified-
  // token cache entry, limit counters, slot map entries) into the reading.
  const warm = await openIdle(wsUrlFor(run, t.auth, warmTokens), S.ws.memWarmup, { batch: S.ws.batch })
  await closeAll(warm.sockets)
  await sleep(S.ws.settle * 1000)
  watch.check()
  const before = await memProbe(run.child)
  const upBefore = run.upstream ? await memProbe(run.upstream.child) : undefined
  const cpu0 = cpuSeconds(run.pid)
  const opened = await openIdle(urlFor, n, { batch: S.ws.batch })
  const cpuOpen = cpuSeconds(run.pid) - cpu0
  await sleep(S.ws.settle * 1000)
  watch.check()
  const after = await memProbe(run.child)
  const upAfter = run.upstream ? await memProbe(run.upstream.child) : undefined
  const gauge = run.adminUrl ? await metricValue(run.adminUrl, 'resonance_ws_connections') : undefined
  const stillOpen = opened.sockets.filter((ws) => ws.readyState === 1).length
  const { gaugeAfterClose, afterClose, closeSeconds } = await closeAndRead(run, opened)
  const logs = logSummary(run.child)
  for (const c of run.stop) await stopChild(c)
  const count = opened.sockets.length
  const r = {
    name: t.name,
    title: t.title,
    opened: count,
    stillOpen,
    failures: new Map([...warm.failures].map(([k, v]) => [`warm-up: ${k}`, v]).concat([...opened.failures])),
    closedEarly: opened.closedEarly,
    openSeconds: opened.seconds,
    cpuUsPerOpen: count ? cpuOpen * 1e6 / count : undefined,
    before,
    after,
    afterClose,
    kibPerConn: count ? (after.rssKiB - before.rssKiB) / count : undefined,
    heapKibPerConn: count && after.heapUsed !== undefined && before.heapUsed !== undefined ? (after.heapUsed - before.heapUsed) / 1024 / count : undefined,
    heapRetainedKibPerConn: count && afterClose.heapUsed !== undefined && before.heapUsed !== undefined ? (afterClose.heapUsed - before.heapUsed) / 1024 / count : undefined,
    upstreamKibPerConn: upBefore && upAfter && count ? (upAfter.rssKiB - upBefore.rssKiB) / count : undefined,
    gauge,
    gaugeAfterClose,
    closeSeconds,
    logs,
    perSub
  }
  console.log(`ws memory: ${t.name}: ${count}/${n} open in ${opened.seconds.toFixed(1)} s (${fmt.us(r.cpuUsPerOpen)} µs CPU per open), RSS ${fmt.mib(before.rssKiB)} -> ${fmt.mib(after.rssKiB)} MiB = ` +
    `${fmt.kib(r.kibPerConn)} KiB/connection (JS heap ${fmt.kib(r.heapKibPerConn)} KiB/connection after GC)` +
    `${gauge !== undefined ? `; gauge ${gauge} open, ${gaugeAfterClose} after closing` : ''}${r.failures.size ? `; FAILED: ${fmtReasons(r.failures)}` : ''}` +
    `${opened.closedEarly.size ? `; CLOSED EARLY: ${fmtReasons(opened.closedEarly)}` : ''}`)
  return r
}

/** Closes every connection; the gauge 1 s later and the "after closing" reading once the heap stops shrinking. */
async function closeAndRead (run, opened) {
  const closedAt = performance.now()
  await closeAll(opened.sockets)
  await sleep(1000)
  const gaugeAfterClose = run.adminUrl ? await metricValue(run.adminUrl, 'resonance_ws_connections') : undefined
  // Close handshakes (client and upstream side) finish asynchronously: read
  // again each second (up to 6 s) until the heap after GC stops shrinking.
  let afterClose = await memProbe(run.child)
  for (let i = 0; i < 5 && afterClose.heapUsed !== undefined; i++) {
    await sleep(1000)
    const next = await memProbe(run.child)
    const settled = next.heapUsed === undefined || afterClose.heapUsed - next.heapUsed < 256 * 1024
    afterClose = next
    if (settled) break
  }
  const closeSeconds = (performance.now() - closedAt) / 1000
  return { gaugeAfterClose, afterClose, closeSeconds }
}
