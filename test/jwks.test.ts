// JWKS robustness against the real (oidc-provider) issuer: discovery vs a pinned JWKS_URL, unknown-kid floods
// (single flight + negative cache by time), rotation without restart, outages (stale keys keep working, readiness
// holds), fetch timeouts that fire, recovery, and the resonance_jwks_fetches_total counter.
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import t from 'tap'
import { decodeProtectedHeader } from 'jose'
import { claims, foreignRsaKey, forgeToken } from './helpers/forge.js'
import { readyz, startBackends, startGateway, untilReady, type TestGateway } from './helpers/gateway.js'
import { scrapeMetric, until } from './helpers/wait.js'

// --- helpers -------------------------------------------------------------------------------------------------------------

async function call (g: TestGateway, token: string, reqId = randomUUID()): Promise<{ status: number, ms: number, reqId: string }> {
  const started = performance.now()
  const res = await fetch(`${g.url}/api/data`, {
    headers: { authorization: `Bearer ${token}`, 'x-request-id': reqId },
    signal: AbortSignal.timeout(10_000)
  })
  await res.arrayBuffer()
  return { status: res.status, ms: performance.now() - started, reqId }
}

const fetches = async (g: TestGateway): Promise<{ ok: number, error: number }> => ({
  ok: await scrapeMetric(g.adminUrl, 'resonance_jwks_fetches_total', { result: 'ok' }),
  error: await scrapeMetric(g.adminUrl, 'resonance_jwks_fetches_total', { result: 'error' })
})

function reasonsOf (g: TestGateway, reqIds: Set<string>): string[] {
  return g.audits().filter((l) => reqIds.has(String(l.reqId))).map((l) => String(l.reason))
}

// --- (a) discovery vs pinned JWKS_URL ------------------------------------------------------------------------------------

t.test('discovery is used when JWKS_URL is unset; JWKS_URL pins the key set without discovery', async (t) => {
  await t.test('discovery', async (tt) => {
    const { issuer, upstream } = await startBackends(tt)
    const g = await startGateway(tt, issuer, upstream)
    tt.ok(issuer.stats.discovery >= 1, `discovery fetched (${issuer.stats.discovery})`)
    tt.equal(issuer.stats.jwks, 1, 'then the JWKS it names, once')
    tt.equal((await call(g, await issuer.token())).status, 200)
    tt.same(await fetches(g), { ok: 1, error: 0 })
  })

  await t.test('pinned', async (tt) => {
    const { issuer, upstream } = await startBackends(tt)
    const g = await startGateway(tt, issuer, upstream, { env: { JWKS_URL: issuer.jwksUrl, JWKS_MIN_REFRESH_INTERVAL: '0' } })
    tt.equal(issuer.stats.jwks, 1, 'JWKS fetched at start')
    tt.equal((await call(g, await issuer.token())).status, 200)
    // an unknown kid forces a refetch: still no discovery
    const foreign = await foreignRsaKey()
    const bogus = await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid: 'bogus' }, payload: claims(issuer) })
    tt.equal((await call(g, bogus)).status, 401)
    tt.equal(issuer.stats.jwks, 2, 'the unknown kid refetched the pinned JWKS')
    tt.equal(issuer.stats.discovery, 0, 'discovery never used')
  })
})

// --- (b) + (c) unknown-kid flood, negative cache by time --------------------------------------------------------------------

t.test('unknown-kid flood: single flight, at most one fetch per JWKS_MIN_REFRESH_INTERVAL', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream, { env: { JWKS_URL: issuer.jwksUrl, JWKS_MIN_REFRESH_INTERVAL: '1s' } })
  const startedAt = Date.now() // the start-up fetch is done by now
  const valid = await issuer.token()
  const foreign = await foreignRsaKey()
  const forged = (kid: string): Promise<string> =>
    forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid }, payload: claims(issuer) })
  const flood = await Promise.all(Array.from({ length: 50 }, (_, i) => forged(`made-up-${i}-${randomUUID()}`)))
  const [late1, late2] = await Promise.all(['after-interval-1', 'after-interval-2'].map(forged))
  const unknownBefore = await scrapeMetric(g.adminUrl, 'resonance_auth_failures_total', { reason: 'unknown_kid', transport: 'http' })

  // let the interval since the start-up fetch pass, so the flood is allowed its one refetch (time-based by nature)
  while (Date.now() - startedAt < 1_100) await sleep(20)

  const jwksBefore = issuer.stats.jwks
  const okBefore = (await fetches(g)).ok
  const floodStarted = Date.now()
  const results = await Promise.all(flood.map((tok, i) => call(g, tok, `flood-${i}-${randomUUID()}`)))
  const floodMs = Date.now() - floodStarted
  const extra = issuer.stats.jwks - jwksBefore

  // One refetch per JWKS_MIN_REFRESH_INTERVAL (1 s): a flood that a loaded machine stretches past the interval may
  // legitimately cost one more.
  const allowed = 1 + Math.floor(floodMs / 1000)
  t.ok(extra <= allowed, `50 made-up kids cost at most ${allowed} JWKS fetch(es) in ${floodMs} ms (cost ${extra}; 1 expected on a quiet machine)`)
  t.same(results.map((r) => r.status), results.map(() => 401), 'all 50 answered 401')
  t.same(reasonsOf(g, new Set(results.map((r) => r.reqId))), results.map(() => 'unknown_kid'), 'all audited unknown_kid')
  t.equal(await scrapeMetric(g.adminUrl, 'resonance_auth_failures_total', { reason: 'unknown_kid', transport: 'http' }) - unknownBefore, 50)
  t.ok(floodMs < 3_000, `fast: ${floodMs} ms for 50 concurrent requests`)
  t.equal((await fetches(g)).ok - okBefore, extra, 'resonance_jwks_fetches_total{result="ok"} counts the same fetches')

  t.equal((await call(g, valid)).status, 200, 'known kids are unaffected')
  const lastFetch = Date.now()
  const jwksAfterFlood = issuer.stats.jwks

  // after the interval (time-based by nature): one more unknown kid triggers exactly one fetch, the next one none
  while (Date.now() - lastFetch < 1_100) await sleep(20)
  const r1 = await call(g, late1 ?? '')
  t.equal(r1.status, 401)
  t.equal(issuer.stats.jwks, jwksAfterFlood + 1, 'after the interval: exactly one more fetch')
  t.match(reasonsOf(g, new Set([r1.reqId])), ['unknown_kid'])
  t.equal((await call(g, late2 ?? '')).status, 401)
  t.equal(issuer.stats.jwks, jwksAfterFlood + 1, 'and the next unknown kid is negative-cached again')
})

t.test('negative cache: inside JWKS_MIN_REFRESH_INTERVAL an unknown kid costs no fetch', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  // the default interval (10 s) comfortably covers this test, however slow the machine
  const g = await startGateway(t, issuer, upstream, { env: { JWKS_URL: issuer.jwksUrl } })
  const foreign = await foreignRsaKey()
  const before = issuer.stats.jwks
  for (const kid of ['probe-1', 'probe-2', 'probe-3']) {
    const r = await call(g, await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid }, payload: claims(issuer) }))
    t.equal(r.status, 401)
    t.match(reasonsOf(g, new Set([r.reqId])), ['unknown_kid'])
  }
  t.equal(issuer.stats.jwks, before, 'no JWKS fetch for unknown kids inside the interval')
  t.equal((await call(g, await issuer.token())).status, 200, 'known kids are unaffected')
})

// --- (d) rotation -----------------------------------------------------------------------------------------------------------

t.test('rotation: a new kid works without restart (one fetch), old-kid tokens keep working', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream, { env: { JWKS_MIN_REFRESH_INTERVAL: '200ms' } })
  const startedAt = Date.now()
  const oldKid = issuer.currentKid()
  const old1 = await issuer.token({ sub: 'before-rotation-1' })
  const old2 = await issuer.token({ sub: 'before-rotation-2' })
  t.equal((await call(g, old1)).status, 200)

  await issuer.rotate()
  // time-based by nature: past the 200 ms JWKS_MIN_REFRESH_INTERVAL since the start-up fetch
  while (Date.now() - startedAt < 300) await sleep(20)
  const jwksBefore = issuer.stats.jwks
  const fresh = await issuer.token({ sub: 'after-rotation' })
  t.not(decodeProtectedHeader(fresh).kid, oldKid, 'the new token carries the new kid')

  t.equal((await call(g, fresh)).status, 200, 'new kid accepted by the running gateway')
  t.equal(issuer.stats.jwks - jwksBefore, 1, 'one JWKS fetch')
  t.equal((await call(g, old2)).status, 200, 'a token with the old kid still works')
  t.equal((await call(g, old1)).status, 200)
  t.equal((await call(g, await issuer.token({ sub: 'after-rotation-2' }))).status, 200)
  t.equal(issuer.stats.jwks - jwksBefore, 1, 'no further fetches')
  t.equal(upstream.requests.length, 5)
  t.equal(upstream.requests[1]?.headers['x-user-sub'], 'after-rotation')
})

// --- (e) JWKS down: stale keys keep working ------------------------------------------------------------------------------------

t.test('JWKS down: known kids keep working, readiness holds', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream, {
    env: { JWKS_CACHE_TTL: '1s', JWKS_MIN_REFRESH_INTERVAL: '1s', JWKS_FETCH_TIMEOUT: '700ms' }
  })
  t.equal((await readyz(g)).status, 200, 'ready once loaded')

  for (const mode of ['error', 'hang'] as const) {
    await t.test(`JWKS ${mode}`, async (tt) => {
      issuer.setJwksMode(mode)
      const jwksBefore = issuer.stats.jwks + issuer.stats.discovery
      const errorsBefore = (await fetches(g)).error
      const outageEnds = Date.now() + 2_600
      let rounds = 0
      let allOk = true
      while (Date.now() < outageEnds) {
        const r = await call(g, await issuer.token({ sub: `outage-${mode}-${rounds}` }))
        const ready = await readyz(g)
        // known kids are answered from memory: never waiting on the failing or hung refresh (timeout 700 ms)
        if (r.status !== 200 || ready.status !== 200 || r.ms > 1_000) {
          allOk = false
          tt.fail(`round ${rounds}: request ${r.status} in ${Math.round(r.ms)} ms, readyz ${ready.status}`)
          break
        }
        rounds++
        await sleep(100) // time-based by nature: rounds spread over the outage
      }
      tt.ok(allOk, `${rounds} fresh tokens over ~2.6 s all answered 200 promptly, /readyz stayed 200`)
      tt.ok(rounds >= 5, 'enough rounds to span several cache TTLs and refresh attempts')
      tt.ok(issuer.stats.jwks + issuer.stats.discovery > jwksBefore, 'the gateway did try to refresh meanwhile')
      if (mode === 'error') {
        tt.ok((await fetches(g)).error > errorsBefore, 'resonance_jwks_fetches_total{result="error"} moved')
      } else {
        // a hung fetch counts once its timeout fires
        await until(async () => (await fetches(g)).error > errorsBefore, 2_000, 'a timed-out refresh is counted', 50)
      }
      issuer.setJwksMode('ok')
    })
  }

  const okBefore = (await fetches(g)).ok
  await until(async () => (await fetches(g)).ok > okBefore, 3_000, 'a refresh succeeds after the outage', 50)
  t.equal((await readyz(g)).body.checks.jwks?.ok, true)
})

// --- (f) fetch timeout fires, readiness, recovery ----------------------------------------------------------------------------------

t.test('JWKS hangs from the start: timeouts fire, 401 jwks_unavailable, /readyz 503, then recovery', async (t) => {
  for (const pinned of [false, true]) {
    await t.test(pinned ? 'pinned JWKS_URL (the JWKS fetch hangs)' : 'discovery (the discovery fetch hangs)', async (t) => {
      const { issuer, upstream } = await startBackends(t)
      issuer.setJwksMode('hang')
      const startedAt = Date.now()
      const g = await startGateway(t, issuer, upstream, {
        env: { JWKS_FETCH_TIMEOUT: '500ms', JWKS_MIN_REFRESH_INTERVAL: '1s', ...(pinned ? { JWKS_URL: issuer.jwksUrl } : {}) }
      })
      const startMs = Date.now() - startedAt
      t.ok(startMs >= 400 && startMs < 2_500, `start() waited for the 500 ms timeout (undici fast timers: 0.5-1 s), then gave up (${startMs} ms)`)
      t.ok(pinned ? issuer.stats.jwks >= 1 && issuer.stats.discovery === 0 : issuer.stats.discovery >= 1,
        `the hung endpoint was really called (${JSON.stringify(issuer.stats)})`)
      const token = await issuer.token({ sub: 'early-bird' })

      const r = await call(g, token)
      t.equal(r.status, 401, 'a valid token cannot be verified yet')
      t.ok(r.ms < 1_500, `answered in ${Math.round(r.ms)} ms, no hang`)
      t.match(reasonsOf(g, new Set([r.reqId])), ['jwks_unavailable'])

      const notReady = await readyz(g)
      t.equal(notReady.status, 503, '/readyz is 503')
      t.equal(notReady.body.checks.jwks?.ok, false)
      t.match(notReady.body.checks.jwks?.detail, pinned ? /jwks|certs/i : /discovery|openid-configuration/i,
        `with a jwks detail: ${String(notReady.body.checks.jwks?.detail)}`)
      const errors = (await fetches(g)).error
      t.ok(errors >= 1, `resonance_jwks_fetches_total{result="error"} = ${errors}`)
      t.equal((await fetches(g)).ok, 0)

      // requests spread over more than one refresh interval: some join a hung refresh, none waits past its timeout
      const spread: Array<Promise<{ status: number, ms: number }>> = []
      for (let i = 0; i < 12; i++) {
        spread.push(call(g, token))
        await sleep(100) // time-based by nature: 12 requests 100 ms apart span the 1 s refresh interval
      }
      const answers = await Promise.all(spread)
      const slowest = Math.max(...answers.map((a) => a.ms))
      t.same(answers.map((a) => a.status), answers.map(() => 401), 'all 401 while the issuer hangs')
      t.ok(slowest < 1_500, `slowest answered in ${Math.round(slowest)} ms`)
      t.equal(upstream.requests.length, 0, 'nothing reached the app')

      issuer.setJwksMode('ok')
      await untilReady(g, 5_000, '/readyz turns 200 after the issuer recovers')
      t.ok((await fetches(g)).ok >= 1, 'resonance_jwks_fetches_total{result="ok"} moved')
      t.equal((await call(g, token)).status, 200, 'the same token now passes')
      t.equal(upstream.requests[0]?.headers['x-user-sub'], 'early-bird')
    })
  }
})
