// Where a token may come from and that it never travels on (issue 10 items 4 and 6): the verified-token cache cannot
// be hit by a header that does not say Bearer, two query tokens are two tokens, and no spelling of access_token in
// the query reaches the app, on plain HTTP and on WebSocket upgrades.
import t from 'tap'
import { randomSub } from './helpers/issuer.js'
import { startBackends, startGateway } from './helpers/gateway.js'
import { until } from './helpers/wait.js'
import { upgrade } from './helpers/ws-client.js'

const { issuer, upstream } = await startBackends(t)
const g = await startGateway(t, issuer, upstream)

t.test('a token seen in ?access_token= does not make a bare `Authorization: <jwt>` acceptable', async (t) => {
  const token = await issuer.token({ sub: randomSub('query') })
  upstream.reset()
  const opened = await upgrade(t, `${g.wsUrl}/ws/chat?access_token=${token}`)
  t.equal(opened.status, 101, 'the upgrade with the query token opens (and is cached)')
  if (opened.kind === 'open') opened.ws.close()
  const bare = await fetch(`${g.url}/api/x`, { headers: { authorization: token } })
  t.equal(bare.status, 401, 'a bare token without the Bearer scheme is no token at all')
  t.equal(upstream.requests.length, 0, 'the app never saw it')
  const proper = await fetch(`${g.url}/api/x`, { headers: { authorization: `Bearer ${token}` } })
  t.equal(proper.status, 200, 'control: the same token as a Bearer header is fine')
  await until(() => g.gw.ws.open === 0, 5000, 'the test socket closed')
})

t.test('two access_token parameters on an upgrade are two tokens: 400 multiple_tokens', async (t) => {
  const a = await issuer.token({ sub: randomSub('twice') })
  upstream.reset()
  const refused = await upgrade(t, `${g.wsUrl}/ws/chat?access_token=${a}&access_token=${a}`)
  t.equal(refused.status, 400)
  t.equal(upstream.wsConnections.length, 0, 'the app saw no WebSocket')
})

t.test('no spelling of access_token reaches the app', async (t) => {
  const token = await issuer.token({ sub: randomSub('spell') })
  const junk = 'eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln'
  const query = [
    'a=1', `ACCESS_TOKEN=${junk}`, `Access_Token=${junk}`, `access_token[]=${junk}`, `access_token%5B0%5D=${junk}`,
    `b=2;access_token=${junk}`, `access.token=${junk}`, `access%20token=${junk}`, `access_token%00=${junk}`, 'c=3'
  ].join('&')
  upstream.reset()
  const res = await fetch(`${g.url}/api/x?${query}`, { headers: { authorization: `Bearer ${token}` } })
  t.equal(res.status, 200)
  t.equal(upstream.requests[0]?.url, '/api/x?a=1&b=2&c=3', 'every spelling removed, the rest kept byte for byte')

  upstream.reset()
  const opened = await upgrade(t, `${g.wsUrl}/ws/chat?access_token=${token}&${query}`)
  t.equal(opened.status, 101, 'the upgrade opens with its one real query token')
  await until(() => upstream.wsConnections.length === 1, 5000, 'the app got the WebSocket')
  t.equal(upstream.wsConnections[0]?.url, '/ws/chat?a=1&b=2&c=3', 'the WebSocket handshake the app got carries no token either')
  t.notOk(JSON.stringify(upstream.wsConnections[0]?.headers).includes(token), 'nor does any header')
  if (opened.kind === 'open') opened.ws.close()
  await until(() => g.gw.ws.open === 0, 5000, 'the test socket closed')
})
