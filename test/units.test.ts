// Table tests for the pure functions the pipeline is built from: durations, path pattern syntax, token
// extraction and removal, and the headers the app receives. One row per rule (STYLE habit 15).
import http, { type IncomingHttpHeaders } from 'node:http'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import { parseDuration } from '../src/config/duration.js'
import { patternError } from '../src/config/patterns.js'
import {
  appProtocols, extractToken, MAX_TOKEN_LENGTH, protocolsValid, stripQueryToken, type Extracted, type TokenCarrier
} from '../src/auth/token.js'
import { upstreamHeaders, upstreamWsHeaders, type ForwardContext } from '../src/proxy/headers.js'
import type { Identity } from '../src/auth/identity.js'

t.test('parseDuration', async (t) => {
  const rows: Array<[unknown, number | undefined]> = [
    // bare numbers are milliseconds
    [0, 0],
    [1500, 1500],
    [60_000, 60_000],
    [1.4, 1],
    // strings, with or without a unit
    ['60000', 60_000],
    ['250ms', 250],
    ['60s', 60_000],
    ['1m', 60_000],
    ['1.5h', 5_400_000],
    ['2d', 172_800_000],
    [' 60s ', 60_000],
    ['60 s', 60_000],
    ['60S', 60_000],
    ['0', 0],
    // unreadable
    ['', undefined],
    ['   ', undefined],
    ['-1', undefined],
    ['-1s', undefined],
    ['1y', undefined],
    ['abc', undefined],
    ['1e3', undefined],
    ['1.5.5s', undefined],
    ['s', undefined],
    ['100000000000000000000', undefined],
    [NaN, undefined],
    [Infinity, undefined],
    [-Infinity, undefined],
    [-5, undefined],
    [null, undefined],
    [undefined, undefined],
    [true, undefined],
    [['60s'], undefined],
    [{}, undefined]
  ]
  for (const [input, expected] of rows) {
    t.equal(parseDuration(input), expected, `${typeof input === 'string' ? JSON.stringify(input) : String(input)} -> ${String(expected)}`)
  }
})

t.test('patternError', async (t) => {
  const rows: Array<[unknown, RegExp | undefined]> = [
    ['/', undefined],
    ['/healthz', undefined],
    ['/api/v1/users', undefined],
    ['/users/*', undefined],
    ['/users/*/profile', undefined],
    ['/api/**', undefined],
    ['/**', undefined],
    ['/a/*/b/**', undefined],
    ['/trailing/', undefined],
    ['', /starting with "\/"/],
    ['api/**', /starting with "\/"/],
    ['*', /starting with "\/"/],
    [5, /starting with "\/"/],
    [null, /starting with "\/"/],
    [undefined, /starting with "\/"/],
    [['/a'], /starting with "\/"/],
    ['/api*', /"\*" only as a whole segment/],
    ['/a/b*c', /"\*" only as a whole segment/],
    ['/a/***', /"\*" only as a whole segment/],
    ['/a/**/b', /"\*\*" only as the last segment/],
    ['/**/x', /"\*\*" only as the last segment/],
    ['/a/**/', /"\*\*" only as the last segment/]
  ]
  for (const [pattern, expected] of rows) {
    const err = patternError(pattern)
    if (expected === undefined) t.equal(err, undefined, `${JSON.stringify(pattern)} is valid`)
    else t.match(err, expected, `${JSON.stringify(pattern) ?? 'undefined'} -> ${String(expected)}`)
  }
})

// A well-formed compact JWS; the content is never verified here.
const JWT = 'eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl'
const JWT2 = 'eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2ln'

t.test('extractToken', async (t) => {
  const plain = (over: Partial<TokenCarrier> = {}): TokenCarrier => ({ url: '/x', upgrade: false, ...over })
  const ws = (over: Partial<TokenCarrier> = {}): TokenCarrier => ({ url: '/ws', upgrade: true, ...over })
  const longJwt = `${'a'.repeat(MAX_TOKEN_LENGTH)}.b.c`
  const maxJwt = `${'a'.repeat(MAX_TOKEN_LENGTH - 4)}.b.c`
  const rows: Array<[string, TokenCarrier, Extracted]> = [
    ['nothing', plain(), { kind: 'none' }],
    ['nothing on an upgrade', ws(), { kind: 'none' }],
    // Authorization header
    ['Bearer header', plain({ authorization: `Bearer ${JWT}` }), { kind: 'token', token: JWT, source: 'header' }],
    ['lowercase scheme', plain({ authorization: `bearer ${JWT}` }), { kind: 'token', token: JWT, source: 'header' }],
    ['uppercase scheme', plain({ authorization: `BEARER ${JWT}` }), { kind: 'token', token: JWT, source: 'header' }],
    ['extra spaces', plain({ authorization: `Bearer    ${JWT}   ` }), { kind: 'token', token: JWT, source: 'header' }],
    ['header on an upgrade', ws({ authorization: `Bearer ${JWT}` }), { kind: 'token', token: JWT, source: 'header' }],
    ['scheme only', plain({ authorization: 'Bearer' }), { kind: 'malformed' }],
    ['scheme and space', plain({ authorization: 'Bearer ' }), { kind: 'malformed' }],
    ['empty header', plain({ authorization: '' }), { kind: 'none' }],
    ['other scheme', plain({ authorization: 'Basic dXNlcjpwYXNz' }), { kind: 'none' }],
    ['scheme prefix of another word', plain({ authorization: `Bearerx ${JWT}` }), { kind: 'none' }],
    ['not JWT-shaped', plain({ authorization: 'Bearer abcdef' }), { kind: 'malformed' }],
    ['two segments', plain({ authorization: 'Bearer a.b' }), { kind: 'malformed' }],
    ['four segments', plain({ authorization: 'Bearer a.b.c.d' }), { kind: 'malformed' }],
    ['padding is not base64url', plain({ authorization: 'Bearer a.b.c==' }), { kind: 'malformed' }],
    ['trailing garbage', plain({ authorization: `Bearer ${JWT} extra` }), { kind: 'malformed' }],
    ['two tokens in the header', plain({ authorization: `Bearer ${JWT}, Bearer ${JWT2}` }), { kind: 'malformed' }],
    ['exactly MAX_TOKEN_LENGTH', plain({ authorization: `Bearer ${maxJwt}` }), { kind: 'token', token: maxJwt, source: 'header' }],
    ['over MAX_TOKEN_LENGTH', plain({ authorization: `Bearer ${longJwt}` }), { kind: 'malformed' }],
    // ?access_token=: upgrades only
    ['query on plain HTTP is ignored', plain({ url: `/x?access_token=${JWT}` }), { kind: 'none' }],
    ['query on an upgrade', ws({ url: `/ws?access_token=${JWT}` }), { kind: 'token', token: JWT, source: 'query' }],
    ['query among others', ws({ url: `/ws?a=1&access_token=${JWT}&b=2` }), { kind: 'token', token: JWT, source: 'query' }],
    ['query with encoded name', ws({ url: `/ws?access%5Ftoken=${JWT}` }), { kind: 'token', token: JWT, source: 'query' }],
    ['empty query token', ws({ url: '/ws?access_token=' }), { kind: 'none' }],
    ['query token not JWT-shaped', ws({ url: '/ws?access_token=abc' }), { kind: 'malformed' }],
    ['query over MAX_TOKEN_LENGTH', ws({ url: `/ws?access_token=${longJwt}` }), { kind: 'malformed' }],
    ['access_token only as a value', ws({ url: '/ws?x=access_token' }), { kind: 'none' }],
    ['two query tokens', ws({ url: `/ws?access_token=${JWT}&access_token=${JWT2}` }), { kind: 'multiple' }],
    ['the same query token twice', ws({ url: `/ws?access_token=${JWT}&access_token=${JWT}` }), { kind: 'multiple' }],
    // Sec-WebSocket-Protocol: upgrades only
    ['protocol on plain HTTP is ignored', plain({ protocolHeader: `bearer, ${JWT}` }), { kind: 'none' }],
    ['protocol bearer, <jwt>', ws({ protocolHeader: `bearer, ${JWT}` }), { kind: 'token', token: JWT, source: 'protocol' }],
    ['protocol bearer, <jwt>, chat', ws({ protocolHeader: `bearer, ${JWT}, chat` }), { kind: 'token', token: JWT, source: 'protocol' }],
    ['protocol chat, bearer, <jwt>', ws({ protocolHeader: `chat, bearer, ${JWT}` }), { kind: 'token', token: JWT, source: 'protocol' }],
    ['protocol without spaces', ws({ protocolHeader: `bearer,${JWT}` }), { kind: 'token', token: JWT, source: 'protocol' }],
    ['protocol marker in capitals', ws({ protocolHeader: `Bearer, ${JWT}` }), { kind: 'token', token: JWT, source: 'protocol' }],
    ['protocol marker without token', ws({ protocolHeader: 'bearer' }), { kind: 'malformed' }],
    ['protocol marker last', ws({ protocolHeader: 'chat, bearer' }), { kind: 'malformed' }],
    ['protocol marker, empty entry', ws({ protocolHeader: 'bearer, ' }), { kind: 'malformed' }],
    ['protocol token not JWT-shaped', ws({ protocolHeader: 'bearer, chat' }), { kind: 'malformed' }],
    ['app protocols only', ws({ protocolHeader: 'chat, v2' }), { kind: 'none' }],
    ['empty protocol header', ws({ protocolHeader: '' }), { kind: 'none' }],
    // more than one carrier (RFC 6750 §2)
    ['header + query', ws({ authorization: `Bearer ${JWT}`, url: `/ws?access_token=${JWT}` }), { kind: 'multiple' }],
    ['header + query, different tokens', ws({ authorization: `Bearer ${JWT}`, url: `/ws?access_token=${JWT2}` }), { kind: 'multiple' }],
    ['header + protocol', ws({ authorization: `Bearer ${JWT}`, protocolHeader: `bearer, ${JWT2}` }), { kind: 'multiple' }],
    ['query + protocol', ws({ url: `/ws?access_token=${JWT}`, protocolHeader: `bearer, ${JWT2}` }), { kind: 'multiple' }],
    ['header + query on plain HTTP: query ignored', plain({ authorization: `Bearer ${JWT}`, url: `/x?access_token=${JWT2}` }), { kind: 'token', token: JWT, source: 'header' }],
    ['non-JWT header + good query: still two carriers', ws({ authorization: 'Bearer junk', url: `/ws?access_token=${JWT}` }), { kind: 'multiple' }],
    ['tokenless header + good query', ws({ authorization: 'Bearer', url: `/ws?access_token=${JWT}` }), { kind: 'malformed' }],
    ['tokenless protocol marker + good header', ws({ authorization: `Bearer ${JWT}`, protocolHeader: 'bearer' }), { kind: 'malformed' }]
  ]
  for (const [name, req, expected] of rows) {
    t.strictSame(extractToken(req), expected, name)
  }
})

t.test('stripQueryToken', async (t) => {
  const rows: Array<[string, string]> = [
    ['/ws', '/ws'],
    ['/ws?a=1', '/ws?a=1'],
    ['/ws?', '/ws?'],
    [`/ws?access_token=${JWT}&a=1`, '/ws?a=1'],
    [`/ws?a=1&access_token=${JWT}&b=2`, '/ws?a=1&b=2'],
    [`/ws?a=1&access_token=${JWT}`, '/ws?a=1'],
    [`/ws?access_token=${JWT}`, '/ws'],
    ['/ws?access_token', '/ws'],
    ['/ws?access_token=', '/ws'],
    [`/ws?access%5Ftoken=${JWT}&a=1`, '/ws?a=1'],
    [`/ws?access%5ftoken=${JWT}&a=1`, '/ws?a=1'],
    [`/ws?%61ccess_token=${JWT}&a=1`, '/ws?a=1'],
    [`/ws?access_token=${JWT}&a=1&access_token=${JWT2}`, '/ws?a=1'],
    [`/ws?access_token=${JWT}&access_token=${JWT2}`, '/ws'],
    // look-alikes are kept, other parameters are not re-encoded
    ['/ws?access_tokens=1', '/ws?access_tokens=1'],
    ['/ws?my_access_token=1', '/ws?my_access_token=1'],
    ['/ws?a=access_token', '/ws?a=access_token'],
    ['/ws?q=a%20b&access_token=x&r=%E2%9C%93', '/ws?q=a%20b&r=%E2%9C%93'],
    ['/ws?bad=%zz&access_token=x', '/ws?bad=%zz'],
    ['/p/access_token?x=1', '/p/access_token?x=1'],
    // every spelling a server-side parser reads as access_token is removed too
    [`/ws?ACCESS_TOKEN=${JWT}&a=1`, '/ws?a=1'],
    [`/ws?Access_Token=${JWT}`, '/ws'],
    [`/ws?access_token[]=${JWT}&a=1`, '/ws?a=1'],
    [`/ws?access_token%5B%5D=${JWT}&a=1`, '/ws?a=1'],
    [`/ws?access_token[0]=${JWT}`, '/ws'],
    [`/ws?a=1;access_token=${JWT}`, '/ws?a=1'],
    [`/ws?;access_token=${JWT}&b=2`, '/ws?b=2'],
    ['/ws?a=1;b=2&c=3', '/ws?a=1;b=2&c=3'],
    [`/ws?access.token=${JWT}`, '/ws'],
    [`/ws?access+token=${JWT}`, '/ws'],
    [`/ws?access%20token=${JWT}`, '/ws'],
    [`/ws?access[token=${JWT}`, '/ws'],
    [`/ws?access_token%00x=${JWT}&a=1`, '/ws?a=1'],
    [`/ws?%20access_token=${JWT}`, '/ws'],
    ['/ws?access_token_hint=1&a=1', '/ws?a=1'],
    ['/ws?accesstoken=1', '/ws?accesstoken=1'],
    ['/ws?access-token=1', '/ws?access-token=1']
  ]
  for (const [url, expected] of rows) {
    t.equal(stripQueryToken(url), expected, url.length > 80 ? `${url.slice(0, 80)}…` : url)
  }
})

t.test('protocolsValid: tokens only, no duplicates (RFC 6455 §4.1)', async (t) => {
  const rows: Array<[string | undefined, boolean]> = [
    [undefined, true],
    ['chat', true],
    ['chat, v2', true],
    [`bearer, ${JWT}`, true],
    [`bearer, ${JWT}, chat`, true],
    [`bearer, ${JWT}, ${JWT}`, false],
    ['chat, chat', false],
    ['chat,,v2', false],
    ['', false],
    ['a b', false],
    ['chat, "v2"', false]
  ]
  for (const [header, expected] of rows) t.equal(protocolsValid(header), expected, String(header))
})

t.test('appProtocols', async (t) => {
  const rows: Array<[string | undefined, string[]]> = [
    [undefined, []],
    ['', []],
    ['chat', ['chat']],
    [' chat , v2 ', ['chat', 'v2']],
    [`bearer, ${JWT}`, []],
    [`Bearer, ${JWT}`, []],
    [`bearer, ${JWT}, chat`, ['chat']],
    [`chat, bearer, ${JWT}, v2`, ['chat', 'v2']],
    ['bearer', []],
    ['chat, bearer', ['chat']]
  ]
  for (const [header, expected] of rows) {
    t.strictSame(appProtocols(header), expected, String(header))
  }
})

const ALICE: Identity = {
  sub: 'f3a1-user',
  username: 'alice',
  roles: ['admin', 'app:read'],
  exp: 2_000_000_000,
  iat: 1_900_000_000,
  jti: 'j1',
  azp: 'web'
}

function ctx (over: Partial<ForwardContext> = {}): ForwardContext {
  return {
    identity: ALICE,
    requestId: 'req-1',
    clientIp: '203.0.113.7',
    remoteAddress: '10.1.2.3',
    protocol: 'https',
    host: 'gw.example.com',
    trustProxy: false,
    forwardAuthorization: false,
    ...over
  }
}

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
