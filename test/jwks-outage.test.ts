// An identity-provider outage must not become a request flood against it (issue 11 item 0): under steady load of
// valid tokens, with the issuer's discovery/JWKS endpoints failing (HTTP 500, HTTP 503, dropped connections), the
// issuer sees at most the attempts the documented backoff allows per process (minRefreshInterval doubling per failed
// attempt, capped at cacheTtl), known kids keep working from the last good set, /readyz stays 200 with the failure in
// its detail, and once the issuer is back the keys refresh again and a rotated key is accepted.
import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import { Pool } from 'undici'
import type { JwksMode, TestIssuer } from './helpers/issuer.js'
import { readyz, startBackends, startGateway, untilReady, type TestGateway } from './helpers/gateway.js'
import { metric, until } from './helpers/wait.js'

const TTL_MS = 1_000
const MIN_MS = 200
const RATE = 300 // requests per second, all valid tokens
const CLIENTS = 6
const OUTAGE_MS = 3_500

/**
 * The most attempts the documented schedule allows in `ms` (README, JWKS behaviour): the first at once, then pauses
 * of MIN_MS, 2*MIN_MS, 4*MIN_MS ... capped at JWKS_CACHE_TTL. Written out here, not imported, so the test states the
 * contract independently of the code.
 */
function scheduleAttempts (ms: number): number {
  let at = 0
  let n = 0
  while (at <= ms) {
    n++
    at += Math.min(TTL_MS, MIN_MS * 2 ** (n - 1))
  }
  return n
}

interface LoadResult { sent: number, statuses: Record<number, number>, slowestMs: number }

/** CLIENTS keep-alive clients sending valid tokens at RATE req/s in total until `stop()` resolves. */
async function load (g: TestGateway, tokens: string[], stop: Promise<void>): Promise<LoadResult> {
  const pool = new Pool(g.url, { connections: CLIENTS })
  const result: LoadResult = { sent: 0, statuses: {}, slowestMs: 0 }
  const state = { stopped: false }
  stop.then(() => { state.stopped = true }, () => { state.stopped = true })
  const gap = (CLIENTS * 1000) / RATE
  const client = async (i: number): Promise<void> => {
    let next = performance.now()
    while (!state.stopped) {
      const started = performance.now()
      const res = await pool.request({
        method: 'GET',
        path: `/api/outage/${i}`,
        headers: { authorization: `Bearer ${tokens[(result.sent++) % tokens.length] as string}` }
      })
      await res.body.dump()
      result.statuses[res.statusCode] = (result.statuses[res.statusCode] ?? 0) + 1
      result.slowestMs = Math.max(result.slowestMs, performance.now() - started)
      next += gap
      const wait = next - performance.now()
      if (wait > 0) await sleep(wait)
      else next = performance.now()
    }
  }
  try {
    await Promise.all(Array.from({ length: CLIENTS }, (_, i) => client(i)))
  } finally {
    await pool.close()
  }
  return result
}

const fetchesAt = (issuer: TestIssuer): number => issuer.stats.discovery + issuer.stats.jwks

const env = (pinned: string | undefined): Record<string, string> => ({
  JWKS_CACHE_TTL: `${TTL_MS}ms`,
  JWKS_MIN_REFRESH_INTERVAL: `${MIN_MS}ms`,
  JWKS_FETCH_TIMEOUT: '1s',
  RATE_LIMIT_MAX: '1000000',
  ...(pinned !== undefined ? { JWKS_URL: pinned } : {})
})

const CASES: Array<{ mode: JwksMode, pinned: boolean, what: string }> = [
  { mode: 'error', pinned: false, what: 'HTTP 500 from discovery and JWKS (discovery in use)' },
  { mode: 'unavailable', pinned: false, what: 'HTTP 503 from discovery and JWKS (discovery in use)' },
  { mode: 'drop', pinned: true, what: 'connections dropped without an answer (pinned JWKS_URL)' }
]

for (const c of CASES) {
  t.test(`outage under load: ${c.what}`, async (t) => {
    const { issuer, upstream } = await startBackends(t)
    const g = await startGateway(t, issuer, upstream, { env: env(c.pinned ? issuer.jwksUrl : undefined) })
    const tokens = await Promise.all(Array.from({ length: 8 }, (_, i) => issuer.token({ sub: `outage-${c.mode}-${i}`, ttlSeconds: 600 })))
    const okBefore = await metric(g, 'resonance_jwks_fetches_total{result="ok"}')

    issuer.setJwksMode(c.mode)
    const before = fetchesAt(issuer)
    const outageStarted = Date.now()
    let endOutage!: () => void
    const outageOver = new Promise<void>((resolve) => { endOutage = resolve })
    const running = load(g, tokens, outageOver)
    await sleep(OUTAGE_MS) // time-based by nature: the outage lasts OUTAGE_MS under load
    const during = await readyz(g)
    endOutage()
    const r = await running
    const outageMs = Date.now() - outageStarted
    const fetches = fetchesAt(issuer) - before
    // every failed attempt costs one fetch (the discovery, or the JWKS when its location is known)
    const allowed = scheduleAttempts(outageMs) + 1

    t.comment(`${c.mode}: ${r.sent} requests in ${outageMs} ms (${Math.round(r.sent * 1000 / outageMs)}/s), ` +
      `${fetches} fetches at the issuer (discovery ${issuer.stats.discovery}, jwks ${issuer.stats.jwks} in total), schedule allows ${allowed}`)
    t.ok(r.sent >= (RATE * OUTAGE_MS / 1000) * 0.4, `the load really ran (${r.sent} requests)`)
    t.same(Object.keys(r.statuses), ['200'], `every valid token served from the last good key set: ${JSON.stringify(r.statuses)}`)
    t.ok(r.slowestMs < 1_000, `no request waited on the failing issuer (slowest ${Math.round(r.slowestMs)} ms)`)
    t.ok(fetches >= 2, `the gateway kept trying (${fetches} fetches)`)
    t.ok(fetches <= allowed, `fetches at the issuer within the backoff schedule: ${fetches} <= ${allowed}`)
    t.equal(during.status, 200, '/readyz stayed 200: the JWKS had loaded, known keys keep working')
    t.match(during.body.checks.jwks, { ok: true, detail: /refresh failing.*next in/ }, `the jwks check says so: ${String(during.body.checks.jwks?.detail)}`)
    const failLines = g.logs().filter((l) => l.component === 'jwks' && typeof l.msg === 'string' && l.msg.startsWith('jwks refresh failed'))
    t.ok(failLines.length >= 1 && failLines.length <= 2, `one log line per distinct problem (${failLines.length})`)

    // --- the issuer is back: the next attempt (within one backoff step, at most cacheTtl) succeeds -------------------
    issuer.setJwksMode('ok')
    const back = Date.now()
    await until(async () => await metric(g, 'resonance_jwks_fetches_total{result="ok"}') > okBefore, TTL_MS + 3_000, 'a refresh succeeds after the outage')
    t.comment(`${c.mode}: keys refreshed ${Date.now() - back} ms after the issuer recovered`)
    const after = await readyz(g)
    t.match(after, { status: 200, body: { checks: { jwks: { ok: true } } } })
    t.notMatch(after.body.checks.jwks?.detail, /failing/, `no failure left in the detail: ${String(after.body.checks.jwks?.detail)}`)
    t.ok(g.logs().some((l) => l.msg === 'jwks refresh succeeded again'), 'the recovery is logged')
    await issuer.rotate()
    const rotated = await issuer.token({ sub: `after-${c.mode}` })
    let status = 0
    await until(async () => {
      const res = await fetch(`${g.url}/api/rotated`, { headers: { authorization: `Bearer ${rotated}` } })
      await res.arrayBuffer()
      status = res.status
      return status === 200
    }, MIN_MS * 10 + 2_000, 'a token of a key rotated after the outage is accepted')
    t.equal(status, 200, 'rotation works again after the outage')
  })
}

t.test('issuer down from the start under load: discovery is backed off too, then the first load succeeds', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const tokens = await Promise.all(Array.from({ length: 4 }, (_, i) => issuer.token({ sub: `early-${i}`, ttlSeconds: 600 })))
  issuer.setJwksMode('unavailable')
  const startedAt = Date.now()
  const before = fetchesAt(issuer)
  const g = await startGateway(t, issuer, upstream, { env: env(undefined) })
  let endOutage!: () => void
  const outageOver = new Promise<void>((resolve) => { endOutage = resolve })
  const running = load(g, tokens, outageOver)
  await sleep(OUTAGE_MS - (Date.now() - startedAt)) // time-based by nature: the outage lasts OUTAGE_MS under load
  const during = await readyz(g)
  endOutage()
  const r = await running
  const outageMs = Date.now() - startedAt
  const fetches = fetchesAt(issuer) - before
  const allowed = scheduleAttempts(outageMs) + 1
  t.comment(`down from the start: ${r.sent} requests in ${outageMs} ms, ${fetches} discovery fetches (${issuer.stats.jwks} jwks), schedule allows ${allowed}`)
  t.same(Object.keys(r.statuses), ['401'], 'no key set yet: every token refused (jwks_unavailable)')
  t.ok(r.slowestMs < 1_500, `quickly (slowest ${Math.round(r.slowestMs)} ms)`)
  t.equal(issuer.stats.jwks, 0, 'the JWKS itself never reached: discovery fails first')
  t.ok(fetches <= allowed, `discovery fetches within the backoff schedule: ${fetches} <= ${allowed}`)
  t.equal(during.status, 503, '/readyz 503: the JWKS has never loaded')
  t.match(during.body.checks.jwks, { ok: false, detail: /openid-configuration.*next in/ }, `with the failure and the backoff: ${String(during.body.checks.jwks?.detail)}`)

  issuer.setJwksMode('ok')
  await untilReady(g, TTL_MS + 3_000, '/readyz 200 once the issuer answers')
  const res = await fetch(`${g.url}/api/late`, { headers: { authorization: `Bearer ${tokens[0] as string}` } })
  await res.arrayBuffer()
  t.equal(res.status, 200, 'and the same tokens are served')
})
