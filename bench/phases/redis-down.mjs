// Part 2, Redis down: a Redis-backed gateway measured while its Redis is up,
// hung (SIGSTOP) and dead (SIGKILL), then Redis restarted on the same port.
import { stopChild } from '../lib/children.mjs'
import { fmt, fmtNoise } from '../lib/format.mjs'
import { measure, runLoad } from '../lib/load.mjs'
import { logSummary, metricValue, readyzStatus, sleep } from '../lib/probes.mjs'
import { redisCommandStats } from '../lib/redis.mjs'
import { REQUEST_PATH } from '../lib/setup.mjs'
import { S } from '../settings.mjs'
import { startGatewayWithRedis } from '../subjects/index.mjs'
import { preflight } from './preflight.mjs'

/** Part 2. Returns { phases (one row each), recovery, logs, reused, warmup }; stops the gateway. */
export async function redisDownPhase (ctx, tokens, watch) {
  const subject = { name: 'gateway-redis (Redis down)', auth: true, limitHeaders: true }
  const { run, reused } = await gatewayFor(ctx, subject, tokens, watch)
  const redis = run.redis
  run.redisStatsOff = true // INFO would hang on a stopped Redis
  const logMark = run.child.lines.length
  const warmup = S.redisDown.warmup ?? (reused ? 3 : 10)
  console.log(`redis-down: ${reused ? 'the gateway-redis HTTP subject' : 'a fresh gateway'} (pid ${run.pid}) on its private redis-server (pid ${redis.pid}, port ${redis.port}), ` +
    `RATE_LIMIT_ON_STORE_ERROR=open; warming ${warmup} s`)
  if (warmup > 0) await runLoad(run.url, tokens, warmup, { recordLatency: false })
  watch.check()
  const phases = []
  const row = async (label) => phases.push(await measureRow(ctx, subject, run, tokens, watch, label))
  await row('Redis up')
  redis.child.expectedExit = true
  process.kill(redis.pid, 'SIGSTOP')
  await row('Redis hung (SIGSTOP)')
  const gone = new Promise((resolve) => (redis.child.exited ? resolve() : redis.child.once('exit', resolve)))
  process.kill(redis.pid, 'SIGKILL')
  await gone
  await row('Redis dead (SIGKILL)')

  const recovery = await recover(ctx, run, tokens, watch)
  console.log(`redis-down: ${recovery}`)
  // Its log lines belong to this table, not to the HTTP notes.
  const logs = logSummary({ lines: run.child.lines.splice(logMark) })
  await stopChild(run.child)
  return { phases, recovery, logs, reused, warmup }
}

/**
 * The HTTP phase's gateway-redis (warm, and its private Redis is needed by
 * nothing else from here on: the WebSocket Redis row has its own), or a
 * fresh gateway on a fresh private Redis. RATE_LIMIT_ON_STORE_ERROR is
 * `open` in both (the default; set explicitly for a fresh one).
 */
async function gatewayFor (ctx, subject, tokens, watch) {
  let run = ctx.httpRuns.get('gateway-redis')
  const reused = run !== undefined
  if (!reused) {
    run = await startGatewayWithRedis(ctx, 'gateway-redis-down', 'redis-down', { RATE_LIMIT_ON_STORE_ERROR: 'open' })
    await preflight(subject, run, tokens)
    for (const c of [run.child, ...run.extraChildren]) watch.add(c)
  }
  return { run, reused }
}

/** One row: the closed-loop measurement plus the store-error counter, the degraded gauge and /readyz after it. */
async function measureRow (ctx, subject, run, tokens, watch, label) {
  const e0 = await metricValue(run.adminUrl, 'resonance_rate_limit_store_errors_total')
  const m = await measure(subject, run, tokens, 0, ctx.pin, S.redisDown.duration)
  watch.check()
  const e1 = await metricValue(run.adminUrl, 'resonance_rate_limit_store_errors_total')
  m.label = label
  m.storeErrors = e0 === undefined || e1 === undefined ? undefined : e1 - e0
  m.degraded = await metricValue(run.adminUrl, 'resonance_rate_limit_store_degraded')
  m.readyz = await readyzStatus(run.adminUrl)
  const bad = m.non2xx + m.errors + m.timeouts
  console.log(`redis-down ${label.padEnd(22)} ${fmt.int(m.rps).padStart(7)} req/s  p50 ${fmt.ms(m.p50)} ms  p99 ${fmt.ms(m.p99)} ms  max ${fmt.ms(m.max)} ms  ` +
    `longest gap ${fmt.ms(m.maxGap)} ms  ${fmt.us(m.cpuUsPerReq)} µs/req  RSS ${fmt.mib(m.rssKiB)} MiB  store errors ${fmt.int(m.storeErrors)}  /readyz ${m.readyz}  other load ${fmtNoise(m.noise)}${bad ? `  NON-2XX/ERRORS: ${bad}` : ''}`)
  return m
}

/**
 * Recovery (not a measured row): Redis back on the same port. Does the
 * gateway count in Redis again (a) under light continuous traffic, (b) after
 * a pause longer than the store's 1 s breaker? Returns the sentence for the report.
 */
async function recover (ctx, run, tokens, watch) {
  const redis = run.redis
  let recovery
  try {
    const t0 = performance.now()
    const back = await ctx.startRedis('redis-down-restarted', redis.port)
    watch.add(back.child)
    const scripts = async () => { const c = await redisCommandStats(back.port); return (c?.evalsha ?? 0) + (c?.eval ?? 0) }
    const oneRequest = async () => {
      const c0 = await scripts()
      const res = await fetch(`${run.url}${REQUEST_PATH}recovery`, { headers: { authorization: `Bearer ${tokens[0].jwt}` } })
      await res.arrayBuffer()
      return { status: res.status, counted: (await scripts()) > c0 }
    }
    let readyAt
    let usedAt
    let requests = 0
    while (performance.now() < t0 + 6_000 && usedAt === undefined) {
      if (readyAt === undefined && await readyzStatus(run.adminUrl) === 200) readyAt = performance.now()
      requests++
      if ((await oneRequest()).counted) usedAt = performance.now()
      else await sleep(100)
    }
    const s = (t) => `${((t - t0) / 1000).toFixed(1)} s`
    recovery = `Redis restarted on the same port: /readyz 200 after ${readyAt === undefined ? 'more than 6 s' : s(readyAt)}; ` +
      (usedAt !== undefined
        ? `with a request every ~0.1 s, requests were counted in Redis again after ${s(usedAt)}.`
        : `**with a request every ~0.1 s (${requests} requests over 6 s), none was counted in Redis: the gateway stayed on its per-process fallback** ` +
          `(resonance_rate_limit_store_degraded = ${await metricValue(run.adminUrl, 'resonance_rate_limit_store_degraded')}).`)
    if (usedAt === undefined) {
      await sleep(1_500)
      const r = await oneRequest()
      recovery += ` After 1.5 s without requests, the next request ${r.counted ? 'was counted in Redis again' : 'was still not counted in Redis'} (status ${r.status}; degraded gauge now ${await metricValue(run.adminUrl, 'resonance_rate_limit_store_degraded')}).`
    }
  } catch (err) {
    recovery = `recovery check failed: ${err.message.split('\n')[0]}`
  }
  return recovery
}
