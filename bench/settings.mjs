// The settings of `npm run bench` (bench/run.mjs): every BENCH_* knob, read
// once when this module loads (a malformed value exits with code 2), and the
// fixed names the parts share. See bench/README.md.
import path from 'node:path'
import { BENCH_DIR } from './lib/setup.mjs'

/** Where the report goes: bench/results/latest.md, or BENCH_OUT (e.g. a partial run that must not replace the committed results). */
export const RESULTS_FILE = process.env.BENCH_OUT ? path.resolve(process.env.BENCH_OUT) : path.join(BENCH_DIR, 'results/latest.md')
export const WS_PATH = '/api/resonance/ws'
export const BASELINE = 'plain-proxy'
/** The C peer of the HTTP table (second set of ratios), when `haproxy` is installed. */
export const PEER = 'haproxy'
export const WS_BASELINE = 'direct'
/** Realm role every bench token carries; only gateway-nolimit's YAML makes it exempt. */
export const EXEMPT_ROLE = 'bench-exempt'
/** What a gateway needs so that 50 echo loops or 5 connections per user are never refused. */
export const WS_GATEWAY_ENV = { WS_MESSAGE_LIMIT_MAX: '1000000000', WS_MAX_CONNECTIONS_PER_USER: '1000' }
/** Responses slower than this are counted in the Redis-down table. */
export const SLOW_MS = 250

// ------------------------------------------------------------- settings --

/** A mistake in how the bench was invoked: reported as one line, no stack. */
export class UsageError extends Error {}

function envNumber (name, def, { min = 0, integer = false } = {}) {
  const raw = process.env[name]
  if (raw === undefined || raw.trim() === '') return def
  const n = Number(raw)
  if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
    process.stderr.write(`bench: ${name}=${raw}: must be ${integer ? 'an integer' : 'a number'} >= ${min}\n`)
    process.exit(2)
  }
  return n
}

function envFlag (name, def) {
  const raw = process.env[name]?.trim().toLowerCase()
  if (raw === undefined || raw === '') return def
  if (['1', 'true', 'yes', 'on'].includes(raw)) return true
  if (['0', 'false', 'no', 'off'].includes(raw)) return false
  process.stderr.write(`bench: ${name}=${process.env[name]}: must be 0 or 1\n`)
  process.exit(2)
}

export function envList (name) {
  return process.env[name]?.split(',').map((s) => s.trim()).filter(Boolean)
}

export const S = {
  // 1. HTTP
  http: envFlag('BENCH_HTTP', true),
  duration: envNumber('BENCH_DURATION', 8, { min: 1 }),
  warmup: envNumber('BENCH_WARMUP', 3),
  prime: envNumber('BENCH_PRIME', 5),
  rounds: envNumber('BENCH_ROUNDS', 3, { min: 1, integer: true }),
  connections: envNumber('BENCH_CONNECTIONS', 64, { min: 1, integer: true }),
  tokens: envNumber('BENCH_TOKENS', 1000, { min: 1, integer: true }),
  // A folder: every proxy/gateway subject runs with --cpu-prof and writes <name>.cpuprofile there on exit.
  profileDir: process.env.BENCH_PROFILE ? path.resolve(process.env.BENCH_PROFILE) : null,
  // 1b. fixed rate (open loop) through the HTTP subjects: the latency each one adds
  rate: {
    // 'auto' (default): 40% of the slowest HTTP subject's closed-loop req/s, at most 1000: every subject
    // must have headroom, or the run measures queueing, not the latency a proxy adds.
    rps: ['', 'auto', undefined].includes(process.env.BENCH_RATE?.trim()) ? 'auto' : envNumber('BENCH_RATE', 1000, { min: 0 }),
    duration: envNumber('BENCH_RATE_DURATION', 8, { min: 1 }),
    rounds: envNumber('BENCH_RATE_ROUNDS', 2, { min: 1, integer: true }),
    // Seconds at the same rate before each measurement, discarded: right after saturation a Node process pays for
    // the heap it grew (V8's memory reducer, major GCs) in its first seconds at a light load.
    warmup: envNumber('BENCH_RATE_WARMUP', 2)
  },
  // 2. Redis down
  redisDown: {
    enabled: envFlag('BENCH_REDIS_DOWN', true),
    duration: envNumber('BENCH_REDIS_DOWN_DURATION', 6, { min: 1 }),
    // Default: 3 s when the (already primed and measured) gateway-redis HTTP subject is reused, 10 s for a fresh gateway.
    warmup: envNumber('BENCH_REDIS_DOWN_WARMUP', null)
  },
  // 3. + 4. WebSocket
  ws: {
    enabled: envFlag('BENCH_WS', true),
    echoConnections: envNumber('BENCH_WS_ECHO_CONNECTIONS', 50, { min: 1, integer: true }),
    duration: envNumber('BENCH_WS_DURATION', 5, { min: 1 }),
    warmup: envNumber('BENCH_WS_WARMUP', 2),
    prime: envNumber('BENCH_WS_PRIME', 3),
    messageBytes: envNumber('BENCH_WS_MESSAGE_BYTES', 128, { min: 1, integer: true }),
    connections: envNumber('BENCH_WS_CONNECTIONS', 5000, { integer: true }),
    batch: envNumber('BENCH_WS_BATCH', 200, { min: 1, integer: true }),
    memWarmup: envNumber('BENCH_WS_MEM_WARMUP', 200, { integer: true }),
    settle: envNumber('BENCH_WS_SETTLE', 2)
  },
  // 5. cold start: a fresh gateway per variant, loaded from the moment /readyz answers 200
  coldStart: {
    enabled: envFlag('BENCH_COLD_START', true),
    // The period under load, counted per second; steady = median of its last third.
    seconds: envNumber('BENCH_COLD_START_SECONDS', 60, { min: 3, integer: true }),
    rounds: envNumber('BENCH_COLD_START_ROUNDS', 1, { min: 1, integer: true }),
    // Seconds of load through a throwaway gateway before the first variant (app and load generator warm for every variant).
    prime: envNumber('BENCH_COLD_START_PRIME', 15),
    // Seconds of the same load started again on the then warm process, 1 s after the period (0: off): what a load
    // start costs without a cold process.
    control: envNumber('BENCH_COLD_START_CONTROL', 5, { integer: true })
  }
}
