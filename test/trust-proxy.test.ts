// TRUST_PROXY as a hop count (issue 11 item 6): the documented semantics (Envoy's xff_num_trusted_hops) hold for the
// client address (limits, audit, X-Real-IP) and for X-Forwarded-Proto (the plaintext guard), where Fastify 5.12 alone
// trusts nothing for a number.
import t from 'tap'
import { randomSub } from './helpers/issuer.js'
import { startBackends, startGateway } from './helpers/gateway.js'
import { until } from './helpers/wait.js'

const { issuer, upstream } = await startBackends(t)

const BAD = 'eyJhbGciOiJSUzI1NiIsImtpZCI6Im5vcGUifQ.eyJzdWIiOiJ4In0.c2ln'

t.test('TRUST_PROXY=1: the proxy in front (the peer) is trusted, the client is the address it appended', async (t) => {
  const g = await startGateway(t, issuer, upstream, {
    env: { TRUST_PROXY: '1', ALLOW_INSECURE_HTTP: 'false', AUTH_FAILURE_LIMIT_MAX: '2', AUTH_FAILURE_LIMIT_WINDOW: '60s' }
  })
  const token = await issuer.token({ sub: randomSub('hop') })
  const via = (client: string, proto = 'https'): Record<string, string> => ({ 'x-forwarded-for': client, 'x-forwarded-proto': proto })

  upstream.reset()
  const ok = await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${token}`, ...via('198.51.100.7') } })
  t.equal(ok.status, 200, 'a token that came over https to the trusted proxy is accepted')
  const seen = upstream.requests[0]?.headers
  t.equal(seen?.['x-forwarded-proto'], 'https')
  t.equal(seen?.['x-real-ip'], '198.51.100.7', 'the app gets the client address')
  t.equal(seen?.['x-forwarded-for'], '198.51.100.7, 127.0.0.1', 'and the chain, extended with the proxy')

  const plain = await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${token}`, ...via('198.51.100.7', 'http') } })
  t.equal(plain.status, 401, 'the proxy says the client used plain http: refused')

  // The failed-token limit keys on the client, not on the proxy every client shares.
  for (let i = 0; i < 2; i++) t.equal((await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${BAD}`, ...via('198.51.100.9') } })).status, 401)
  await until(async () => (await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${BAD}`, ...via('198.51.100.9') } })).status === 429, 5000, 'client .9 blocked')
  t.equal((await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${BAD}`, ...via('198.51.100.10') } })).status, 401, 'another client behind the same proxy is not')
  t.match(g.audits().find((l) => l.reason === 'auth_failures'), { ip: '198.51.100.9' }, 'audit lines name the client')
})

t.test('TRUST_PROXY=2: two trusted hops; what a client wrote further left is ignored', async (t) => {
  const g = await startGateway(t, issuer, upstream, { env: { TRUST_PROXY: '2' } })
  const token = await issuer.token({ sub: randomSub('hops') })
  for (const [xff, client] of [
    ['203.0.113.1, 10.0.0.5', '203.0.113.1'],
    ['6.6.6.6, 203.0.113.1, 10.0.0.5', '203.0.113.1']
  ] as const) {
    upstream.reset()
    t.equal((await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${token}`, 'x-forwarded-for': xff } })).status, 200)
    t.equal(upstream.requests[0]?.headers['x-real-ip'], client, `X-Forwarded-For: ${xff} -> client ${client}`)
  }
})

t.test('no TRUST_PROXY: X-Forwarded-* from the peer count for nothing', async (t) => {
  const g = await startGateway(t, issuer, upstream, { env: { ALLOW_INSECURE_HTTP: 'false' } })
  const token = await issuer.token({ sub: randomSub('direct') })
  upstream.reset()
  const r = await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${token}`, 'x-forwarded-for': '198.51.100.7', 'x-forwarded-proto': 'https' } })
  t.equal(r.status, 401, 'plain http stays plain http')
  t.equal(upstream.requests.length, 0)
})
