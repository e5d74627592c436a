// The admin listener: liveness, readiness (JWKS loaded, not draining), the metric catalogue, and graceful close
// (in-flight requests finish).
import t from 'tap'
import { startBackends, startGateway } from './helpers/gateway.js'
import { until } from './helpers/wait.js'

const REQUIRED_METRICS = [
  'resonance_auth_failures_total',
  'resonance_rate_limit_triggered_total',
  'resonance_forbidden_total',
  'resonance_http_requests_total',
  'resonance_http_request_duration_seconds',
  'resonance_upstream_errors_total',
  'resonance_jwks_fetches_total',
  'resonance_jwks_keys',
  'resonance_ws_connections',
  'resonance_ws_messages_total',
  'resonance_ws_closes_total',
  'process_cpu_seconds_total',
  'process_resident_memory_bytes',
  'nodejs_eventloop_lag_seconds'
]

t.test('admin endpoints', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream)

  const health = await fetch(`${g.adminUrl}/healthz`)
  t.equal(health.status, 200)
  const ready = await fetch(`${g.adminUrl}/readyz`)
  t.equal(ready.status, 200)
  t.match(await ready.json(), { status: 'ready', checks: { jwks: { ok: true }, draining: { ok: true } } })

  const res = await fetch(`${g.adminUrl}/metrics`)
  t.match(res.headers.get('content-type'), /text\/plain/)
  const text = await res.text()
  for (const name of REQUIRED_METRICS) t.match(text, new RegExp(`^# TYPE ${name} `, 'm'), name)
  t.match(text, /resonance_auth_failures_total\{reason="expired",transport="ws"\} 0/, 'closed label sets exist at zero')
  t.notMatch(text, /sub=|ip=|path=/, 'no unbounded labels')
  t.match(text, /resonance_jwks_fetches_total\{result="ok"\} 1/)

  g.gw.readiness.draining = true
  const draining = await fetch(`${g.adminUrl}/readyz`)
  t.equal(draining.status, 503)
  t.match(await draining.json(), { status: 'not_ready', checks: { draining: { ok: false } } })
  t.equal((await fetch(`${g.adminUrl}/healthz`)).status, 200, 'liveness does not depend on readiness')
  g.gw.readiness.draining = false
})

t.test('readiness waits for the JWKS', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  issuer.setJwksMode('error')
  const g = await startGateway(t, issuer, upstream, { noStart: true })
  await g.gw.start()
  const res = await fetch(`${g.adminUrl}/readyz`)
  t.equal(res.status, 503)
  t.match(await res.json(), { checks: { jwks: { ok: false, detail: /failed/ } } })
})

t.test('close lets in-flight requests finish and refuses new ones', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream)
  const auth = { authorization: `Bearer ${await issuer.token()}` }

  const inflight = fetch(`${g.url}/slow?ms=600`, { headers: auth })
  await until(() => upstream.requests.some((r) => r.url.startsWith('/slow')), 10_000, 'the request reached the app')
  const closing = g.close()
  t.equal(g.gw.readiness.draining, true, 'readiness fails first')
  const res = await inflight
  t.equal(res.status, 200, 'the in-flight request completed')
  await closing
  await t.rejects(fetch(`${g.url}/x`, { headers: auth }), 'the listener is gone after close')
})

t.test('readiness shows Redis when configured', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const { redisUrl } = await import('./helpers/redis.js')
  const up = await startGateway(t, issuer, upstream, { env: { REDIS_URL: await redisUrl() } })
  const ok = await fetch(`${up.adminUrl}/readyz`)
  t.equal(ok.status, 200)
  t.match(await ok.json(), { checks: { redis: { ok: true } } })

  // Nothing listens on port 1: Redis configured but unreachable. With the default RATE_LIMIT_ON_STORE_ERROR=open the
  // site keeps serving, so the replica stays ready and the check reports the outage (test/readiness.test.ts: closed).
  const down = await startGateway(t, issuer, upstream, { env: { REDIS_URL: 'redis://127.0.0.1:1/0' } })
  const res = await fetch(`${down.adminUrl}/readyz`)
  t.equal(res.status, 200)
  t.match(await res.json(), { checks: { redis: { ok: true, detail: /^degraded: / } } })
  const unavailable = down.logs().filter((l) => l.msg === 'redis unavailable')
  t.equal(unavailable.length, 1, 'the outage is logged once, not once per retry')
})
