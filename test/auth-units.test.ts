// Table tests for the pure functions of src/auth/token.ts: token extraction and removal, and WebSocket subprotocols.
// One row per rule (STYLE habit 15).
import t from 'tap'
import {
  appProtocols, extractToken, MAX_TOKEN_LENGTH, protocolsValid, stripQueryToken, type Extracted, type TokenCarrier
} from '../src/auth/token.js'

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
