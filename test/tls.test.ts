// TLS termination in the gateway: with TLS_CERT/TLS_KEY it serves HTTPS (and WSS), and tokens are accepted there
// without ALLOW_INSECURE_HTTP, while the same token over plain HTTP (another gateway without TLS) is refused.
import t from 'tap'
import { Agent, request } from 'undici'
import WebSocket from 'ws'
import { selfSignedCert, startBackends, startGateway } from './helpers/gateway.js'

t.test('HTTPS with TLS_CERT/TLS_KEY', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const { cert, key } = selfSignedCert()
  const g = await startGateway(t, issuer, upstream, { env: { TLS_CERT: cert, TLS_KEY: key, ALLOW_INSECURE_HTTP: 'false' } })
  const port = new URL(g.url).port
  const dispatcher = new Agent({ connect: { rejectUnauthorized: false } })
  t.teardown(() => dispatcher.close())
  const token = await issuer.token({ sub: 'tls-user' })

  const res = await request(`https://127.0.0.1:${port}/api/resonance/x`, { dispatcher, headers: { authorization: `Bearer ${token}` } })
  t.equal(res.statusCode, 200, 'a token over TLS is accepted without ALLOW_INSECURE_HTTP')
  await res.body.dump()
  t.equal(upstream.requests[0]?.headers['x-forwarded-proto'], 'https')
  t.equal(upstream.requests[0]?.headers['x-user-sub'], 'tls-user')

  const noToken = await request(`https://127.0.0.1:${port}/api/resonance/x`, { dispatcher })
  t.equal(noToken.statusCode, 401)
  await noToken.body.dump()

  const ws = new WebSocket(`wss://127.0.0.1:${port}/ws/resonance`, { headers: { authorization: `Bearer ${token}` }, rejectUnauthorized: false })
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  ws.send('over wss')
  t.equal(String(await new Promise((resolve) => ws.once('message', resolve))), 'over wss', 'WSS works end to end')
  ws.close()

  await t.rejects(request(`http://127.0.0.1:${port}/api/resonance/x`, { headers: { authorization: `Bearer ${token}` }, headersTimeout: 2000 }),
    'plain HTTP to the TLS port gets no answer')
})

t.test('without TLS the same token over plain HTTP is refused', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream, { env: { ALLOW_INSECURE_HTTP: 'false' } })
  const res = await fetch(`${g.url}/api/resonance/x`, { headers: { authorization: `Bearer ${await issuer.token()}` } })
  t.equal(res.status, 401)
  t.match(res.headers.get('www-authenticate'), /error="invalid_request"/)
  t.equal(upstream.requests.length, 0)
})
