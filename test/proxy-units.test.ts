// Table tests for the pure functions of src/proxy/headers.ts: the headers the app receives. One row per rule
// (STYLE habit 15).
import http, { type IncomingHttpHeaders } from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import { upstreamHeaders, upstreamWsHeaders, type ForwardContext } from '../src/proxy/headers.js'
import { ALICE, forwardContext as ctx } from './helpers/units.js'

// A well-formed compact JWS; the content is never verified here.
const JWT = 'eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl'

const identityHeaders = (h: Record<string, unknown>): string[] => Object.keys(h).filter((k) => k.toLowerCase().startsWith('x-user-'))

t.test('upstreamHeaders', async (t) => {
  t.test('strips every client-supplied x-user-* and injects the verified identity', async (t) => {
    const out = upstreamHeaders({
      'x-user-sub': 'root',
      'x-user-roles': 'admin,superuser',
      'x-user-name': 'mallory',
      'x-user-email': 'm@evil',
      'x-user-': 'empty suffix',
      accept: 'application/json'
    }, ctx())
    t.strictSame(identityHeaders(out).sort(), ['x-user-name', 'x-user-roles', 'x-user-sub'])
    t.equal(out['x-user-sub'], 'f3a1-user')
    t.equal(out['x-user-roles'], 'admin,app:read')
    t.equal(out['x-user-name'], 'alice')
    t.equal(out.accept, 'application/json')
  })

  t.test('no identity: no x-user-* at all, even the client\'s', async (t) => {
    const out = upstreamHeaders({ 'x-user-sub': 'root', 'x-user-roles': 'admin' }, ctx({ identity: null }))
    t.strictSame(identityHeaders(out), [])
  })

  t.test('no roles and no username: those headers are absent, not empty', async (t) => {
    const out = upstreamHeaders({ 'x-user-roles': 'admin', 'x-user-name': 'mallory' }, ctx({ identity: { ...ALICE, roles: [], username: undefined } }))
    t.strictSame(identityHeaders(out), ['x-user-sub'])
  })

  t.test('non-ASCII and control characters in identity values are percent-encoded', async (t) => {
    const out = upstreamHeaders({}, ctx({ identity: { ...ALICE, sub: 'ü-1', username: 'Jürgen Groß', roles: ['rôle'] } }))
    t.equal(out['x-user-name'], 'J%C3%BCrgen%20Gro%C3%9F')
    t.equal(out['x-user-sub'], '%C3%BC-1')
    t.equal(out['x-user-roles'], 'r%C3%B4le')
    const crlf = upstreamHeaders({}, ctx({ identity: { ...ALICE, username: 'a\r\nx-user-roles: admin' } }))
    t.equal(crlf['x-user-name'], 'a%0D%0Ax-user-roles:%20admin')
    for (const v of Object.values(crlf)) t.notMatch(String(v), /[\r\n]/)
  })

  t.test('strips Forwarded always', async (t) => {
    t.notOk('forwarded' in upstreamHeaders({ forwarded: 'for=1.2.3.4;proto=https' }, ctx()))
    t.notOk('forwarded' in upstreamHeaders({ forwarded: 'for=1.2.3.4;proto=https' }, ctx({ trustProxy: true })))
  })

  t.test('untrusted: client x-forwarded-* are dropped and replaced by our own', async (t) => {
    const out = upstreamHeaders({
      'x-forwarded-for': '198.51.100.66',
      'x-forwarded-proto': 'http',
      'x-forwarded-host': 'evil.example',
      'x-forwarded-prefix': '/admin',
      'x-forwarded-user': 'root',
      'x-real-ip': '198.51.100.66',
      'x-request-id': 'client-chosen'
    }, ctx())
    t.strictSame(out, {
      'x-forwarded-for': '10.1.2.3',
      'x-forwarded-proto': 'https',
      'x-forwarded-host': 'gw.example.com',
      'x-real-ip': '203.0.113.7',
      'x-request-id': 'req-1',
      'x-user-sub': 'f3a1-user',
      'x-user-roles': 'admin,app:read',
      'x-user-name': 'alice'
    })
  })

  t.test('trusted: the X-Forwarded-For chain is extended with the peer, other x-forwarded-* kept', async (t) => {
    const out = upstreamHeaders({
      'x-forwarded-for': '198.51.100.66, 10.0.0.1',
      'x-forwarded-prefix': '/app',
      'x-forwarded-proto': 'http'
    }, ctx({ trustProxy: true }))
    t.equal(out['x-forwarded-for'], '198.51.100.66, 10.0.0.1, 10.1.2.3')
    t.equal(out['x-forwarded-prefix'], '/app')
    t.equal(out['x-forwarded-proto'], 'https', 'proto is what the gateway derived')
    t.equal(out['x-forwarded-host'], 'gw.example.com')
  })

  t.test('trusted but no prior chain, or an empty one: the peer alone', async (t) => {
    t.equal(upstreamHeaders({}, ctx({ trustProxy: true }))['x-forwarded-for'], '10.1.2.3')
    t.equal(upstreamHeaders({ 'x-forwarded-for': '' }, ctx({ trustProxy: true }))['x-forwarded-for'], '10.1.2.3')
  })

  t.test('no remote address (socket gone): falls back to the client IP', async (t) => {
    t.equal(upstreamHeaders({}, ctx({ remoteAddress: undefined }))['x-forwarded-for'], '203.0.113.7')
  })

  t.test('authorization dropped unless forwardAuthorization', async (t) => {
    t.notOk('authorization' in upstreamHeaders({ authorization: `Bearer ${JWT}` }, ctx()))
    t.equal(upstreamHeaders({ authorization: `Bearer ${JWT}` }, ctx({ forwardAuthorization: true })).authorization, `Bearer ${JWT}`)
  })

  t.test('does not mutate its input', async (t) => {
    const input: IncomingHttpHeaders = { 'x-user-sub': 'root', authorization: 'Bearer x', 'x-forwarded-for': '1.1.1.1' }
    const copy = { ...input }
    upstreamHeaders(input, ctx())
    t.strictSame(input, copy)
  })

  t.test('headers as Node parses them off the wire: any case of X-User-* is stripped', async (t) => {
    const server = http.createServer((req, res) => {
      const out = upstreamHeaders(req.headers, ctx())
      res.setHeader('content-type', 'application/json')
      res.end(JSON.stringify(out))
    })
    server.listen(0, '127.0.0.1')
    await once(server, 'listening')
    t.teardown(() => { server.close() })
    const { port } = server.address() as AddressInfo
    const body = await new Promise<string>((resolve, reject) => {
      const req = http.request({
        host: '127.0.0.1',
        port,
        path: '/',
        agent: false,
        headers: { 'X-User-Sub': 'root', 'X-USER-ROLES': 'admin', 'x-UsEr-NaMe': 'mallory', 'X-User-Extra': 'x', Forwarded: 'for=1.1.1.1', 'X-Forwarded-Host': 'evil' }
      }, (res) => {
        let data = ''
        res.setEncoding('utf8')
        res.on('data', (c: string) => { data += c })
        res.on('end', () => resolve(data))
      })
      req.on('error', reject)
      req.end()
    })
    const out = JSON.parse(body) as Record<string, string>
    t.strictSame(identityHeaders(out).sort(), ['x-user-name', 'x-user-roles', 'x-user-sub'])
    t.equal(out['x-user-sub'], 'f3a1-user')
    t.equal(out['x-user-roles'], 'admin,app:read')
    t.equal(out['x-user-name'], 'alice')
    t.notOk('forwarded' in out)
    t.equal(out['x-forwarded-host'], 'gw.example.com')
  })
})

t.test('upstreamWsHeaders', async (t) => {
  const handshake: IncomingHttpHeaders = {
    host: 'gw.example.com',
    connection: 'Upgrade',
    upgrade: 'websocket',
    'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==',
    'sec-websocket-version': '13',
    'sec-websocket-extensions': 'permessage-deflate; client_max_window_bits',
    'sec-websocket-protocol': `bearer, ${JWT}, chat`,
    'sec-websocket-accept': 'bogus',
    'content-length': '0',
    'transfer-encoding': 'chunked',
    'keep-alive': 'timeout=5',
    te: 'trailers',
    trailer: 'x',
    'proxy-connection': 'keep-alive',
    'proxy-authorization': 'Basic eDp5',
    authorization: `Bearer ${JWT}`,
    'x-user-sub': 'root',
    cookie: 'a=1',
    origin: 'https://app.example.com',
    'user-agent': 'test',
    'x-multi': ['a', 'b'],
    'x-undefined': undefined
  }

  t.test('drops handshake and hop-by-hop headers, the token and client identity', async (t) => {
    const out = upstreamWsHeaders(handshake, ctx())
    for (const name of [
      'host', 'connection', 'upgrade', 'sec-websocket-key', 'sec-websocket-version', 'sec-websocket-extensions',
      'sec-websocket-protocol', 'sec-websocket-accept', 'content-length', 'transfer-encoding', 'keep-alive', 'te',
      'trailer', 'proxy-connection', 'proxy-authorization', 'authorization', 'x-undefined'
    ]) {
      t.notOk(name in out, `${name} dropped`)
    }
    t.equal(out['x-user-sub'], 'f3a1-user')
    t.equal(out.cookie, 'a=1')
    t.equal(out.origin, 'https://app.example.com')
    t.equal(out['x-multi'], 'a, b', 'repeated header joined')
    t.equal(out['x-forwarded-for'], '10.1.2.3')
    t.equal(out['x-forwarded-proto'], 'https')
    t.equal(out['x-forwarded-host'], 'gw.example.com')
    t.equal(out['x-request-id'], 'req-1')
    for (const s of Object.values(out)) t.notMatch(s, JWT, 'no header carries the token')
  })

  t.test('never emits undefined (or non-string) values', async (t) => {
    const variants: Array<[string, ForwardContext]> = [
      ['default', ctx()],
      ['no identity', ctx({ identity: null })],
      ['trusted proxy', ctx({ trustProxy: true })],
      ['forwardAuthorization', ctx({ forwardAuthorization: true })],
      ['no remote address', ctx({ remoteAddress: undefined })]
    ]
    for (const [name, c] of variants) {
      const out = upstreamWsHeaders(handshake, c)
      const bad = Object.entries(out).filter(([, v]) => typeof v !== 'string').map(([k]) => k)
      t.strictSame(bad, [], name)
    }
  })

  t.test('forwardAuthorization applies to the WebSocket handshake too', async (t) => {
    t.equal(upstreamWsHeaders(handshake, ctx({ forwardAuthorization: true })).authorization, `Bearer ${JWT}`)
  })
})
