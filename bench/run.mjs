#!/usr/bin/env node
// `npm run bench`: what the gateway costs, as ratios against baselines
// measured in the same run. See bench/README.md.
//
//   load generator (autocannon / ws clients, in this process)   pinned to CPU A
//   app, issuer, proxies, gateways, private redis-servers         pinned to CPU B, one process each
//
// Parts, each optional (bench/phases/):
//   1. HTTP (http.mjs): every subject once per round, rounds interleaved, each run =
//      warm-up then measurement; medians over rounds. CPU µs/request =
//      utime+stime of the subject's process during the measurement / responses.
//      Rate-limit rows: gateway-nolimit (exempt), gateway (in-process store),
//      gateway-redis (private Redis).
//   1b. Fixed rate (fixed-rate.mjs): the HTTP subjects at a fixed request rate
//      (open loop): the latency each one adds.
//   2. Redis down (redis-down.mjs): a gateway on its own private Redis, measured with Redis up,
//      hung (SIGSTOP) and dead (SIGKILL).
//   3. WebSocket echo (ws-echo.mjs): round trips/s and latency, direct vs plain proxy vs
//      gateway, interleaved rounds like (1).
//   4. WebSocket memory (ws-memory.mjs): RSS per idle connection with BENCH_WS_CONNECTIONS open,
//      gateway vs the app directly, fresh processes.
//   5. Cold start (cold-start.mjs): a fresh gateway per variant (node flags / env), loaded from the
//      moment /readyz answers 200; requests per second as a fraction of its own steady rate.
//
// Env: bench/settings.mjs and bench/README.md. The rows of each table:
// bench/subjects/index.mjs. The tables and bench/results/latest.md: bench/report.mjs.
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { hasCommand, installCleanup, openFilesLimit, setupPinning, stopAll } from './lib/children.mjs'
import { banner } from './lib/format.mjs'
import { makeWatch, stopLoad } from './lib/load.mjs'
import { redisServerVersion, startRedis } from './lib/redis.mjs'
import { imageNode } from './lib/node-image.mjs'
import { DIST, ROOT, childEnv, makeKey, signTokens, snapshotDist, startIssuerAndApp } from './lib/setup.mjs'
import { coldStartPhase } from './phases/cold-start.mjs'
import { chooseRate, ratePhase } from './phases/fixed-rate.mjs'
import { httpPhase } from './phases/http.mjs'
import { redisDownPhase } from './phases/redis-down.mjs'
import { wsEchoPhase } from './phases/ws-echo.mjs'
import { wsMemPhase } from './phases/ws-memory.mjs'
import { report } from './report.mjs'
import { EXEMPT_ROLE, S, UsageError, envList } from './settings.mjs'
import { COLD_START_VARIANTS, MEM_TARGETS, SUBJECTS, WS_SUBJECTS } from './subjects/index.mjs'

function pick (list, envName, enabled) {
  if (!enabled) return []
  const wanted = envList(envName)
  for (const w of wanted ?? []) {
    if (!list.some((s) => s.name === w)) throw new UsageError(`${envName}: unknown name "${w}" (known: ${list.map((s) => s.name).join(', ')})`)
  }
  return list.filter((s) => {
    if (!(wanted ? wanted.includes(s.name) : s.default)) return false
    if (s.requires === undefined || hasCommand(s.requires)) return true
    if (wanted) throw new UsageError(`${envName}: "${s.name}" needs \`${s.requires}\` on PATH (Debian: apt-get install ${s.requires})`)
    console.log(`note: ${s.name} skipped: \`${s.requires}\` is not installed (Debian: apt-get install ${s.requires})`)
    return false
  })
}

/**
 * Variants with their Node binary (`execPath`): the image's Node is installed here, before any timing starts.
 * When it cannot be had, a variant named in BENCH_COLD_START_VARIANTS stops the run; a default one is skipped.
 */
function withNodes (variants) {
  const named = envList('BENCH_COLD_START_VARIANTS') !== undefined
  // Found (or installed) once for every variant that runs on it: { node } or { err }.
  let image
  const findImage = () => { try { return { node: imageNode(path.join(ROOT, 'Dockerfile')) } } catch (err) { return { err } } }
  return variants.flatMap((v) => {
    if (v.node !== 'image') return [{ ...v, execPath: process.execPath, title: `${v.title}; Node ${process.version}` }]
    image ??= findImage()
    const { node, err } = image
    if (node !== undefined) return [{ ...v, execPath: node.path, title: `${v.title}; Node v${node.version}` }]
    if (named) throw new UsageError(`cold-start variant ${v.name}: ${err.message} (or leave it out: BENCH_COLD_START_VARIANTS)`)
    console.log(`note: cold-start variant ${v.name} skipped: ${err.message}`)
    return []
  })
}

/** What runs: the rows of each part (BENCH_*_SUBJECTS), after the checks that stop a run before it starts. */
function choose () {
  const subjects = pick(SUBJECTS, 'BENCH_SUBJECTS', S.http)
  const wsSubjects = pick(WS_SUBJECTS, 'BENCH_WS_SUBJECTS', S.ws.enabled)
  const memTargets = pick(MEM_TARGETS, 'BENCH_WS_MEM_SUBJECTS', S.ws.enabled && S.ws.connections > 0)
  const coldVariants = withNodes(pick(COLD_START_VARIANTS, 'BENCH_COLD_START_VARIANTS', S.coldStart.enabled))
  const needRedis = subjects.some((s) => s.needsRedis) || wsSubjects.some((s) => s.needsRedis) || S.redisDown.enabled
  const redisVersion = needRedis ? redisServerVersion() : undefined
  if (needRedis && redisVersion === undefined) {
    throw new UsageError('redis-server not found on PATH: install it, or leave out the Redis parts (BENCH_SUBJECTS without gateway-redis, BENCH_REDIS_DOWN=0)')
  }
  if (memTargets.length > 0) {
    // The gateway holds two sockets per proxied connection, the runner one.
    const need = 2 * S.ws.connections + 500
    const have = openFilesLimit()
    if (have !== undefined && have < need) {
      throw new UsageError(`BENCH_WS_CONNECTIONS=${S.ws.connections} needs an open-files limit of at least ${need} (have ${have}): raise it (\`ulimit -n ${need}\`) or lower BENCH_WS_CONNECTIONS`)
    }
  }
  if (subjects.length + wsSubjects.length + memTargets.length + coldVariants.length === 0 && !S.redisDown.enabled) throw new UsageError('nothing to run')
  return { subjects, wsSubjects, memTargets, coldVariants, redisVersion }
}

/** Seconds the run should take (the plan line, and the runaway guard). */
function plannedSeconds ({ subjects, wsSubjects, memTargets, coldVariants }) {
  const wsRound = S.ws.warmup + S.ws.duration + 1
  return subjects.length * (S.prime + S.rounds * (S.warmup + S.duration)) +
    (S.rate.rps !== 0 ? subjects.length * S.rate.rounds * (S.rate.warmup + S.rate.duration + 1) : 0) +
    (S.redisDown.enabled ? (S.redisDown.warmup ?? (subjects.some((s) => s.name === 'gateway-redis') ? 3 : 10)) + 3 * S.redisDown.duration + 10 : 0) +
    wsSubjects.length * (S.ws.prime + S.rounds * wsRound) +
    memTargets.length * (2 * S.ws.settle + 5 + S.ws.connections * 0.004) +
    (coldVariants.length ? (S.coldStart.prime > 0 ? S.coldStart.prime + 3 : 0) + S.coldStart.rounds * coldVariants.length * (S.coldStart.seconds + 1 + (S.coldStart.control > 0 ? S.coldStart.control + 1 : 0) + 3) : 0)
}

function printPlan ({ subjects, wsSubjects, memTargets, coldVariants }, planned) {
  console.log(`plan: HTTP ${subjects.map((s) => s.name).join(', ') || '(none)'}; ${S.rounds} rounds × (${S.warmup} s warm-up + ${S.duration} s measured), ` +
    `${S.prime} s priming per subject, ${S.connections} connections, ${S.tokens} tokens`)
  console.log(`plan: fixed rate ${S.rate.rps !== 0 && subjects.length ? `${S.rate.rps} req/s open loop, ${S.rate.rounds} rounds × ${S.rate.duration} s per HTTP subject` : 'skipped'}`)
  console.log(`plan: Redis down ${S.redisDown.enabled ? `up / hung / dead, ${S.redisDown.duration} s each` : 'skipped'}; ` +
    `WebSocket echo ${wsSubjects.map((s) => s.name).join(', ') || 'skipped'}${wsSubjects.length ? ` (${S.ws.echoConnections} connections, ${S.ws.warmup} s + ${S.ws.duration} s per round)` : ''}; ` +
    `WebSocket memory ${memTargets.map((s) => s.name).join(', ') || 'skipped'}${memTargets.length ? ` (${S.ws.connections} connections)` : ''}`)
  console.log(`plan: cold start ${coldVariants.length ? `${coldVariants.map((v) => v.name).join(', ')}: a fresh gateway each, ${S.coldStart.rounds} round${S.coldStart.rounds > 1 ? 's' : ''} × ${S.coldStart.seconds} s of load from /readyz 200` : 'skipped'}; about ${Math.round(planned)} s in all`)
}

/**
 * The shared processes and files of a run: the children's env and configs, the
 * issuer and the app, the private-Redis starter, and the tokens. Returns
 * { ctx, tokens, warmTokens, children } (children: issuer and app).
 */
async function startContext (pin, tmp, memTargets) {
  const { cleanEnv, emptyConfig } = await childEnv(tmp)
  const exemptConfig = path.join(tmp, 'exempt.yaml')
  writeFileSync(exemptConfig, `# gateway-nolimit: every bench token carries this realm role\nrateLimit:\n  exempt:\n    roles: [${EXEMPT_ROLE}]\n`)

  const key = await makeKey()
  const { issuerChild, appChild, issuer, app } = await startIssuerAndApp(key, { cleanEnv, pin })
  const redisDir = path.join(tmp, 'redis')
  mkdirSync(redisDir)
  const ctx = {
    pin,
    cleanEnv,
    tmp,
    publicKeyPem: key.publicKeyPem,
    emptyConfig,
    exemptConfig,
    httpRuns: new Map(),
    issuer,
    app,
    startRedis: (name, port) => startRedis(name, { pin, env: cleanEnv, dir: redisDir, port })
  }

  const t0 = Date.now()
  // EXEMPT_ROLE means nothing unless a gateway's YAML names it (gateway-nolimit).
  const extraRoles = [EXEMPT_ROLE]
  const tokens = await signTokens(key, ctx.issuer.issuer, S.tokens, { extraRoles })
  // The WebSocket memory warm-up's own users (see wsMemPhase).
  const warmTokens = memTargets.length && S.ws.memWarmup > 0 ? await signTokens(key, ctx.issuer.issuer, Math.min(S.ws.memWarmup, 200), { extraRoles }) : []
  console.log(`signed ${tokens.length + warmTokens.length} RS256 tokens (distinct subs) in ${Date.now() - t0} ms; issuer ${ctx.issuer.issuer}`)
  return { ctx, tokens, warmTokens, children: { issuer: issuerChild, app: appChild } }
}

async function main () {
  if (!existsSync(path.join(DIST, 'server.js'))) throw new UsageError(`${path.join(DIST, 'server.js')} not found: run \`npm run build\` (npm run bench does)`)
  const build = snapshotDist()
  const parts = choose()
  const { subjects, wsSubjects, memTargets, coldVariants, redisVersion } = parts
  const planned = plannedSeconds(parts)
  const started = Date.now()

  const tmp = mkdtempSync(path.join(os.tmpdir(), 'resonance-bench-'))
  process.on('exit', () => rmSync(tmp, { recursive: true, force: true }))
  installCleanup(stopLoad)
  // Runaway guard: the run is bounded even if something hangs.
  const budget = Math.round(planned * 1.3 + 120)
  setTimeout(() => { throw new Error(`bench exceeded its time budget (${budget} s)`) }, budget * 1000).unref()

  const nproc = os.availableParallelism() // before pinning narrows it to one CPU
  const pin = setupPinning()
  const pinText = pin.applied
    ? `applied: load generator (this process, pid ${process.pid}) on CPU ${pin.loadgenCpu}; app, issuer, private redis-servers and every subject on CPU ${pin.subjectCpu}`
    : `NOT applied (${pin.reason}): load generator and subjects share the CPUs, numbers are noisier`
  console.log(`pinning: ${pinText}`)
  printPlan(parts, planned)
  const { ctx, tokens, warmTokens, children } = await startContext(pin, tmp, memTargets)

  const watch = makeWatch()
  watch.add(children.issuer)
  watch.add(children.app)

  const http = subjects.length ? await httpPhase(ctx, subjects, tokens, watch) : undefined
  // Before the Redis-down phase: that one kills gateway-redis's Redis.
  chooseRate(http?.rows)
  const fixed = subjects.length && S.rate.rps > 0 ? await ratePhase(ctx, subjects, tokens, watch) : undefined
  const down = S.redisDown.enabled ? await redisDownPhase(ctx, tokens, watch) : undefined
  const wsEcho = wsSubjects.length ? await wsEchoPhase(ctx, wsSubjects, tokens, watch) : undefined
  const wsMem = memTargets.length ? await wsMemPhase(ctx, memTargets, tokens, warmTokens, watch) : undefined
  const cold = coldVariants.length ? await coldStartPhase(ctx, coldVariants, tokens, watch) : undefined

  let issuerStats = 'n/a'
  try { issuerStats = JSON.stringify(await (await fetch(`${ctx.issuer.url}/stats`)).json()) } catch {}
  const elapsed = (Date.now() - started) / 1000
  const children_ = { ...children, httpRuns: ctx.httpRuns }
  const failed = report({ subjects, http, fixed, down, wsEcho, wsMem, cold, pin, pinText, nproc, build, redisVersion, issuerStats, elapsed, children: children_ })
  await stopAll()
  if (failed) process.exitCode = 1
}

main().catch((err) => {
  if (err instanceof UsageError) process.stderr.write(`bench: ${err.message}\n`)
  else process.stderr.write(banner(`bench failed: ${err.stack ?? err.message}`))
  process.exit(1) // the exit handler kills every child
})
