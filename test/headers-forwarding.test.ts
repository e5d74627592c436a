// Headers the app could misread (issue 10, item 6), through real sockets (real issuer, recording app, gateway
// in-process). A raw `net` client is used wherever a client library would hide or rewrite the bytes.
//   - identity headers (X-User-Sub, X-User-Name, each role of X-User-Roles) are percent-encoded so that splitting
//     X-User-Roles on `,` and decodeURIComponent of each value gives back exactly the claim: a role `viewer,admin` is
//     one role, `josé` and a literal `jos%C3%A9` are different users; HTTP and WebSocket;
//   - client headers a CGI/PHP/Python/Rack stack reads as the gateway's own (`X-User_Sub`, `X_User_Roles`,
//     `X_Forwarded_For`, `X_Request_Id`, `X-Real-IP`, `X_Real_IP`, httpoxy's `Proxy`) never reach the app; X-Real-IP
//     is the client address the gateway derived; HTTP and WebSocket;
//   - hop-by-hop request headers (RFC 9110 7.6.1: Connection and the names it lists, Keep-Alive, Proxy-Connection,
//     TE, Trailer, Upgrade, Proxy-Authorization, Proxy-Authenticate, Expect) never reach the app, and none of them
//     breaks the request; HTTP and the WebSocket handshake;
//   - the app's hop-by-hop response headers (Connection and the names it lists, Keep-Alive, Proxy-Connection, TE,
//     Trailer, Upgrade, Proxy-Authenticate) never reach the client: the client's `Connection: close` is honoured even
//     when the app says keep-alive, and the app's `Connection: close` does not close the client's connection.
// Then the pure functions behind it, table style: encodeIdentityValue, upstreamHeaders / upstreamWsHeaders (request
// direction), rewriteDownstreamHeaders (response direction).
import { randomUUID } from 'node:crypto'
import net from 'node:net'
import t, { type Test } from 'tap'
import WebSocket from 'ws'
import { claims } from './helpers/forge.js'
import { respondHeaders, type RecordedWs } from './helpers/upstream.js'
import { startBackends, startGateway } from './helpers/gateway.js'
import { until, within } from './helpers/wait.js'
import { encodeIdentityValue, rewriteDownstreamHeaders, upstreamHeaders, upstreamWsHeaders } from '../src/proxy/headers.js'
import { ALICE, forwardContext as ctx } from './helpers/units.js'

const { issuer, upstream } = await startBackends(t)
const g = await startGateway(t, issuer, upstream)
const token = await issuer.token({ sub: 'hop-user', realmRoles: ['user'], username: 'hop' })
t.beforeEach(() => { upstream.reset() })

// --- a raw HTTP/1.1 client ---------------------------------------------------------------------------------------

interface RawResponse {
  status: number
  /** Header lines as received: [name exactly as sent, value]. */
  lines: Array<[string, string]>
  body: string
  /** 1xx interim responses seen before this one. */
  interim: number[]
}

function header (r: RawResponse, name: string): string[] {
  return r.lines.filter(([n]) => n.toLowerCase() === name).map(([, v]) => v)
}

class RawConn {
  private buf = Buffer.alloc(0)
  ended = false

  private constructor (private readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => { this.buf = Buffer.concat([this.buf, d]) })
    socket.on('end', () => { this.ended = true })
    socket.on('close', () => { this.ended = true })
    socket.on('error', () => {})
  }

  static async open (url: string): Promise<RawConn> {
    const { hostname, port } = new URL(url)
    const socket = net.connect(Number(port), hostname)
    await new Promise<void>((resolve, reject) => { socket.once('connect', resolve); socket.once('error', reject) })
    return new RawConn(socket)
  }

  send (text: string | Buffer): void { this.socket.write(text) }

  /** The next final response (1xx skipped and counted); fails after 5 s. */
  async response (): Promise<RawResponse> {
    let parsed: RawResponse | undefined
    await until(() => (parsed = this.parse()) !== undefined, 5000, 'a complete response')
    return parsed as RawResponse
  }

  /** The raw bytes received so far, as text (for a 101, whose "body" belongs to the WebSocket). */
  text (): string { return this.buf.toString('latin1') }

  /** Resolves when the peer has closed the connection; fails after 5 s. */
  async closedByPeer (): Promise<void> {
    await until(() => this.ended, 5000, 'the gateway closes the connection')
  }

  destroy (): void { this.socket.destroy() }

  private parse (): RawResponse | undefined {
    const interim: number[] = []
    let at = 0
    for (;;) {
      const end = this.buf.indexOf('\r\n\r\n', at)
      if (end === -1) return undefined
      const [statusLine, ...rest] = this.buf.subarray(at, end).toString('latin1').split('\r\n')
      const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine ?? '')?.[1])
      const lines = rest.map((l): [string, string] => { const i = l.indexOf(':'); return [l.slice(0, i), l.slice(i + 1).trim()] })
      const r: RawResponse = { status, lines, body: '', interim }
      let bodyAt = end + 4
      if (status >= 100 && status < 200) { interim.push(status); at = bodyAt; continue }
      const length = header(r, 'content-length')[0]
      if (length !== undefined) {
        if (this.buf.length < bodyAt + Number(length)) return undefined
        r.body = this.buf.subarray(bodyAt, bodyAt + Number(length)).toString('utf8')
        this.buf = this.buf.subarray(bodyAt + Number(length))
        return r
      }
      if (header(r, 'transfer-encoding')[0] === 'chunked') {
        const chunks: Buffer[] = []
        for (;;) {
          const eol = this.buf.indexOf('\r\n', bodyAt)
          if (eol === -1) return undefined
          const size = parseInt(this.buf.subarray(bodyAt, eol).toString('latin1'), 16)
          if (size === 0) {
            const done = this.buf.indexOf('\r\n\r\n', eol)
            if (done === -1) return undefined
            r.body = Buffer.concat(chunks).toString('utf8')
            this.buf = this.buf.subarray(done + 4)
            return r
          }
          if (this.buf.length < eol + 2 + size + 2) return undefined
          chunks.push(this.buf.subarray(eol + 2, eol + 2 + size))
          bodyAt = eol + 2 + size + 2
        }
      }
      if (!this.ended) return undefined // body until close
      r.body = this.buf.subarray(bodyAt).toString('utf8')
      this.buf = Buffer.alloc(0)
      return r
    }
  }
}

function request (path: string, lines: string[], body = ''): string {
  return `GET ${path} HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer ${token}\r\n${lines.map((l) => `${l}\r\n`).join('')}\r\n${body}`
}

/** Header names as a CGI/WSGI/PHP/Rack environment would see them (HTTP_X_USER_SUB for x-user_sub and x-user-sub). */
const cgi = (name: string): string => name.toLowerCase().replaceAll('_', '-')

// --- identity header encoding ------------------------------------------------------------------------------------

async function signed (over: Record<string, unknown>): Promise<string> {
  return await issuer.sign(claims(issuer, { jti: randomUUID(), ...over }))
}

const IDENTITIES: Array<{ what: string, claims: Record<string, unknown>, sub: string, name: string | undefined, roles: string | undefined, decoded: { sub: string, name?: string, roles: string[] } }> = [
  {
    what: 'a role containing a comma stays one role; space and % are encoded',
    claims: { sub: 'alice@example.com', preferred_username: 'alice@example.com', realm_access: { roles: ['viewer,admin', 'a b', '50%'] } },
    sub: 'alice@example.com',
    name: 'alice@example.com',
    roles: 'viewer%2Cadmin,a%20b,50%25',
    decoded: { sub: 'alice@example.com', name: 'alice@example.com', roles: ['viewer,admin', 'a b', '50%'] }
  },
  {
    what: 'josé: UTF-8 bytes percent-encoded',
    claims: { sub: 'josé', preferred_username: 'josé', realm_access: { roles: ['ünï', 'plain'] } },
    sub: 'jos%C3%A9',
    name: 'jos%C3%A9',
    roles: '%C3%BCn%C3%AF,plain',
    decoded: { sub: 'josé', name: 'josé', roles: ['ünï', 'plain'] }
  },
  {
    what: 'a literal jos%C3%A9 is not josé: its % is encoded',
    claims: { sub: 'jos%C3%A9', preferred_username: 'jos%C3%A9', realm_access: { roles: ['viewer', 'admin'] } },
    sub: 'jos%25C3%25A9',
    name: 'jos%25C3%25A9',
    roles: 'viewer,admin',
    decoded: { sub: 'jos%C3%A9', name: 'jos%C3%A9', roles: ['viewer', 'admin'] }
  }
]

function checkIdentity (tt: Test, headers: Record<string, unknown>, row: typeof IDENTITIES[number]): void {
  tt.equal(headers['x-user-sub'], row.sub, `${row.what}: X-User-Sub`)
  tt.equal(headers['x-user-name'], row.name, `${row.what}: X-User-Name`)
  tt.equal(headers['x-user-roles'], row.roles, `${row.what}: X-User-Roles`)
  tt.equal(decodeURIComponent(String(headers['x-user-sub'])), row.decoded.sub, `${row.what}: sub decodes back exactly`)
  tt.equal(decodeURIComponent(String(headers['x-user-name'])), row.decoded.name, `${row.what}: name decodes back exactly`)
  tt.strictSame(String(headers['x-user-roles']).split(',').map(decodeURIComponent), row.decoded.roles, `${row.what}: roles split and decode back exactly`)
}

t.test('identity headers: each value decodes back to exactly the claim (HTTP)', async (tt) => {
  for (const row of IDENTITIES) {
    upstream.reset()
    const res = await fetch(`${g.url}/api/who`, { headers: { authorization: `Bearer ${await signed(row.claims)}` } })
    tt.equal(res.status, 200, row.what)
    await res.arrayBuffer()
    checkIdentity(tt, upstream.requests[0]?.headers ?? {}, row)
  }
  tt.not(IDENTITIES[1]?.sub, IDENTITIES[2]?.sub, 'josé and jos%C3%A9 reach the app as different users')
})

t.test('identity headers: the same encoding on the WebSocket handshake', async (tt) => {
  for (const row of IDENTITIES) {
    upstream.reset()
    const ws = new WebSocket(`${g.wsUrl}/ws/who`, { headers: { authorization: `Bearer ${await signed(row.claims)}` } })
    await within(new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject) }), 5000, 'upgrade')
    await until(() => upstream.wsConnections.length === 1, 3000, 'the app got the upgrade')
    checkIdentity(tt, upstream.wsConnections[0]?.headers ?? {}, row)
    ws.terminate()
  }
})

// --- client headers read as the gateway's --------------------------------------------------------------------------

const SPOOFS = [
  'X-User_Sub: root',
  'X_User_Roles: admin',
  'X_USER_NAME: mallory',
  'x-user_email: root@evil',
  'X-Real-IP: 198.51.100.66',
  'X_Real_IP: 198.51.100.67',
  'X_Forwarded_For: 198.51.100.68',
  'X_Forwarded_Host: evil.example',
  'X-Forwarded_Proto: https',
  'X_Request_Id: client-chosen',
  'Proxy: http://198.51.100.69:3128',
  'X-Normal: kept',
  'X_Custom_Underscore: kept too'
]

function checkSpoofsGone (tt: Test, headers: Record<string, unknown>, requestId: string | undefined): void {
  const names = Object.keys(headers)
  const identity = names.filter((n) => cgi(n).startsWith('x-user-')).sort()
  tt.strictSame(identity, ['x-user-name', 'x-user-roles', 'x-user-sub'], 'only the gateway\'s own X-User-* (no underscore variants)')
  tt.equal(headers['x-user-sub'], 'hop-user')
  tt.equal(headers['x-user-roles'], 'user')
  tt.equal(headers['x-user-name'], 'hop')
  for (const managed of ['x-real-ip', 'x-forwarded-for', 'x-forwarded-host', 'x-forwarded-proto', 'x-request-id']) {
    tt.strictSame(names.filter((n) => cgi(n) === managed), [managed], `${managed}: only the gateway's, no underscore variant`)
  }
  tt.equal(headers['x-real-ip'], '127.0.0.1', 'X-Real-IP is the client address the gateway derived')
  tt.equal(headers['x-forwarded-for'], '127.0.0.1')
  tt.equal(headers['x-forwarded-host'], 'gw.test')
  if (requestId !== undefined) tt.equal(headers['x-request-id'], requestId, 'X-Request-Id is the gateway\'s')
  tt.notOk('proxy' in headers, 'httpoxy: no Proxy header (CGI would expose it as HTTP_PROXY)')
  tt.equal(headers['x-normal'], 'kept', 'ordinary headers pass')
  tt.equal(headers.x_custom_underscore, 'kept too', 'underscore headers the gateway does not manage pass')
}

t.test('client headers a CGI/PHP/Python stack reads as the gateway\'s are stripped; X-Real-IP set (HTTP)', async (tt) => {
  const c = await RawConn.open(g.url)
  tt.teardown(() => c.destroy())
  c.send(request('/api/spoof', SPOOFS))
  const res = await c.response()
  tt.equal(res.status, 200)
  const requestId = header(res, 'x-request-id')[0]
  tt.not(requestId, 'client-chosen')
  checkSpoofsGone(tt, upstream.requests[0]?.headers ?? {}, requestId)
})

t.test('client headers a CGI/PHP/Python stack reads as the gateway\'s are stripped; X-Real-IP set (WebSocket)', async (tt) => {
  const headers: Record<string, string> = { authorization: `Bearer ${token}`, host: 'gw.test' }
  for (const line of SPOOFS) { const i = line.indexOf(':'); headers[line.slice(0, i)] = line.slice(i + 1).trim() }
  const ws = new WebSocket(`${g.wsUrl}/ws/spoof`, { headers })
  tt.teardown(() => ws.terminate())
  await within(new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject) }), 5000, 'upgrade')
  await until(() => upstream.wsConnections.length === 1, 3000, 'the app got the upgrade')
  checkSpoofsGone(tt, upstream.wsConnections[0]?.headers ?? {}, undefined)
})

// --- hop-by-hop request headers ------------------------------------------------------------------------------------

const HOP_REQUEST: Array<[string, string[], string[]]> = [
  // what, header lines sent, header names the app must not receive
  // (the app does see a Connection header: undici's own, for the gateway's connection to it)
  ['Connection and a header it names', ['Connection: keep-alive, X-Client-Hop', 'X-Client-Hop: secret'], ['x-client-hop']],
  ['Keep-Alive', ['Keep-Alive: timeout=9'], ['keep-alive']],
  ['Proxy-Connection', ['Proxy-Connection: keep-alive'], ['proxy-connection']],
  ['TE', ['TE: trailers'], ['te']],
  ['Trailer', ['Trailer: X-Checksum'], ['trailer']],
  ['Upgrade without Connection: upgrade', ['Upgrade: h2c'], ['upgrade']],
  ['Proxy-Authorization', ['Proxy-Authorization: Basic eDp5'], ['proxy-authorization']],
  ['Proxy-Authenticate', ['Proxy-Authenticate: Basic realm="x"'], ['proxy-authenticate']]
]

t.test('hop-by-hop request headers never reach the app, and none breaks the request (HTTP)', async (tt) => {
  for (const [what, lines, absent] of HOP_REQUEST) {
    upstream.reset()
    const c = await RawConn.open(g.url)
    c.send(request('/api/hop', [...lines, 'X-Normal: kept']))
    const res = await c.response()
    c.destroy()
    tt.equal(res.status, 200, `${what}: 200 (${res.body.slice(0, 120)})`)
    const seen = upstream.requests[0]?.headers ?? {}
    for (const name of absent) tt.notOk(name in seen, `${what}: the app got no ${name}`)
    tt.notMatch(String(seen.connection ?? ''), /x-client-hop/i, `${what}: the client's Connection value is not passed on`)
    tt.equal(seen['x-normal'], 'kept', `${what}: ordinary headers pass`)
  }
})

t.test('Expect: 100-continue is the gateway\'s business: the app gets the body, no Expect', async (tt) => {
  const c = await RawConn.open(g.url)
  tt.teardown(() => c.destroy())
  const body = 'expect-body'
  c.send(request('/echo', ['Expect: 100-continue', 'Content-Type: text/plain', `Content-Length: ${body.length}`]).replace(/^GET /, 'POST '))
  c.send(body)
  const res = await c.response()
  tt.equal(res.status, 200, res.body.slice(0, 120))
  tt.equal(res.body, body, 'echoed')
  const seen = upstream.requests[0]
  tt.equal(seen?.body.toString(), body)
  tt.notOk('expect' in (seen?.headers ?? {}), 'the app got no Expect')
})

t.test('a chunked request body still arrives whole (the gateway frames the body itself)', async (tt) => {
  const c = await RawConn.open(g.url)
  tt.teardown(() => c.destroy())
  c.send(request('/echo', ['Transfer-Encoding: chunked', 'Content-Type: text/plain']).replace(/^GET /, 'POST '))
  c.send('5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n')
  const res = await c.response()
  tt.equal(res.status, 200)
  tt.equal(res.body, 'hello world')
  tt.equal(upstream.requests[0]?.body.toString(), 'hello world')
})

t.test('hop-by-hop headers never reach the app on the WebSocket handshake', async (tt) => {
  const c = await RawConn.open(g.url)
  tt.teardown(() => c.destroy())
  c.send(request('/ws/hop', [
    'Upgrade: websocket',
    'Connection: Upgrade, X-Client-Hop',
    'X-Client-Hop: secret',
    'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==',
    'Sec-WebSocket-Version: 13',
    'Keep-Alive: timeout=9',
    'Proxy-Connection: keep-alive',
    'TE: trailers',
    'Trailer: X-Checksum',
    'Proxy-Authorization: Basic eDp5',
    'Proxy-Authenticate: Basic realm="x"',
    'X-Normal: kept'
  ]))
  await until(() => c.text().includes('\r\n\r\n'), 5000, 'handshake answer')
  tt.match(c.text(), /^HTTP\/1\.1 101 /, '101')
  await until(() => upstream.wsConnections.length === 1, 3000, 'the app got the upgrade')
  const seen = (upstream.wsConnections[0] as RecordedWs).headers
  for (const name of ['x-client-hop', 'keep-alive', 'proxy-connection', 'te', 'trailer', 'proxy-authorization', 'proxy-authenticate']) {
    tt.notOk(name in seen, `the app got no ${name}`)
  }
  tt.equal(seen['x-normal'], 'kept')
})

// --- hop-by-hop response headers -----------------------------------------------------------------------------------

const APP_HOP: Array<[string, string]> = [
  ['Connection', 'keep-alive, X-App-Hop'],
  ['Keep-Alive', 'timeout=17, max=3'],
  ['X-App-Hop', 'secret'],
  ['Proxy-Connection', 'keep-alive'],
  ['TE', 'trailers'],
  ['Upgrade', 'h2c'],
  ['Proxy-Authenticate', 'Basic realm="app"'],
  ['X-App-Normal', 'yes']
]

function checkNoAppHop (tt: Test, res: RawResponse, what: string): void {
  for (const name of ['x-app-hop', 'proxy-connection', 'te', 'trailer', 'upgrade', 'proxy-authenticate']) {
    tt.strictSame(header(res, name), [], `${what}: no ${name} to the client`)
  }
  for (const v of header(res, 'keep-alive')) tt.notMatch(v, /timeout=17|max=3/, `${what}: not the app's Keep-Alive`)
  tt.strictSame(header(res, 'x-app-normal'), ['yes'], `${what}: the app's ordinary headers pass`)
  tt.ok(header(res, 'connection').length <= 1, `${what}: at most one Connection header`)
}

t.test('the client\'s Connection: close is honoured although the app says keep-alive; the app\'s hop-by-hop headers stay away', async (tt) => {
  const c = await RawConn.open(g.url)
  tt.teardown(() => c.destroy())
  c.send(request(`/respond?headers=${respondHeaders(APP_HOP)}`, ['Connection: close']))
  const res = await c.response()
  tt.equal(res.status, 200)
  checkNoAppHop(tt, res, 'Connection: close')
  tt.strictSame(header(res, 'connection'), ['close'], 'Connection: close answered')
  tt.strictSame(header(res, 'keep-alive'), [], 'no Keep-Alive at all')
  await c.closedByPeer()
})

t.test('a keep-alive client keeps its connection when the app answers Connection: close', async (tt) => {
  const c = await RawConn.open(g.url)
  tt.teardown(() => c.destroy())
  c.send(request(`/respond?headers=${respondHeaders([['Connection', 'close'], ['Keep-Alive', 'timeout=17, max=3'], ['X-App-Normal', 'yes']])}`, []))
  const first = await c.response()
  tt.equal(first.status, 200)
  checkNoAppHop(tt, first, 'app closes')
  tt.notSame(header(first, 'connection'), ['close'], 'the app\'s Connection: close is not passed on')
  c.send(request(`/respond?headers=${respondHeaders([...APP_HOP, ['Trailer', 'X-Checksum']])}`, []))
  const second = await c.response()
  tt.equal(second.status, 200, 'a second request on the same connection')
  checkNoAppHop(tt, second, 'second')
  tt.notOk(c.ended, 'still open')
})

// --- the pure functions ------------------------------------------------------------------------------------------

t.test('encodeIdentityValue: 0x21-0x7E except % and , unchanged; everything else %XX of the UTF-8 bytes', async (tt) => {
  const rows: Array<[string, string]> = [
    ['alice@example.com', 'alice@example.com'],
    ['f3a1-user_9.x~!*\'()[]{}<>:;"/?=+&$#|\\^`', 'f3a1-user_9.x~!*\'()[]{}<>:;"/?=+&$#|\\^`'],
    ['resonance-gateway:editor', 'resonance-gateway:editor'],
    ['josé', 'jos%C3%A9'],
    ['jos%C3%A9', 'jos%25C3%25A9'],
    ['viewer,admin', 'viewer%2Cadmin'],
    ['100%', '100%25'],
    ['a b', 'a%20b'],
    ['Jürgen Groß', 'J%C3%BCrgen%20Gro%C3%9F'],
    ['a\r\nx-user-roles: admin', 'a%0D%0Ax-user-roles:%20admin'],
    ['tab\there', 'tab%09here'],
    ['nul\u0000', 'nul%00'],
    ['del\u007f', 'del%7F'],
    ['emoji \u{1F600}', 'emoji%20%F0%9F%98%80'],
    ['東京', '%E6%9D%B1%E4%BA%AC'],
    ['', '']
  ]
  for (const [input, expected] of rows) {
    const out = encodeIdentityValue(input)
    tt.equal(out, expected, JSON.stringify(input))
    tt.equal(decodeURIComponent(out), input, `${JSON.stringify(input)} decodes back exactly`)
    tt.notMatch(out, /[^\x21-\x7e]|,/, `${JSON.stringify(input)}: visible ASCII, no comma`)
  }
  // A lone surrogate (JSON allows "\ud800") has no UTF-8 form: it becomes U+FFFD instead of throwing.
  tt.equal(encodeIdentityValue('a\ud800b'), 'a%EF%BF%BDb')
})

t.test('X-User-Roles: each role encoded, then joined with ","', async (tt) => {
  const rows: Array<[string[], string | undefined]> = [
    [['viewer,admin'], 'viewer%2Cadmin'],
    [['viewer', 'admin'], 'viewer,admin'],
    [['a b', '50%', 'rôle', 'app:x'], 'a%20b,50%25,r%C3%B4le,app:x'],
    [[], undefined]
  ]
  for (const [roles, expected] of rows) {
    const out = upstreamHeaders({}, ctx({ identity: { ...ALICE, roles } }))
    tt.equal(out['x-user-roles'], expected, JSON.stringify(roles))
    if (expected !== undefined) tt.strictSame(expected.split(',').map(decodeURIComponent), roles, `${JSON.stringify(roles)} round-trips`)
  }
})

t.test('request direction: what is dropped, per header name, HTTP and WebSocket', async (tt) => {
  // name, value, dropped when the peer is not trusted, dropped when it is
  const rows: Array<[string, string, boolean, boolean]> = [
    ['connection', 'keep-alive', true, true],
    ['keep-alive', 'timeout=5', true, true],
    ['proxy-connection', 'keep-alive', true, true],
    ['te', 'trailers', true, true],
    ['trailer', 'x-checksum', true, true],
    ['transfer-encoding', 'chunked', true, true],
    ['upgrade', 'h2c', true, true],
    ['proxy-authorization', 'Basic eDp5', true, true],
    ['proxy-authenticate', 'Basic', true, true],
    ['expect', '100-continue', true, true],
    ['proxy', 'http://evil:3128', true, true],
    ['forwarded', 'for=1.2.3.4', true, true],
    ['x-user-email', 'root@evil', true, true],
    ['x-user_sub', 'root', true, true],
    ['x_user_roles', 'admin', true, true],
    ['x_user_', 'x', true, true],
    ['x-forwarded-prefix', '/admin', true, false],
    ['x_forwarded_prefix', '/admin', true, true],
    ['x_forwarded_for', '1.2.3.4', true, true],
    ['x_real_ip', '1.2.3.4', true, true],
    ['x_request_id', 'chosen', true, true],
    ['x_custom', 'kept', false, false],
    ['x-custom', 'kept', false, false],
    ['x_user', 'kept: not x-user-*', false, false],
    ['proxy-status', 'kept', false, false],
    ['trailers', 'kept', false, false],
    ['expected', 'kept', false, false],
    ['cookie', 'a=1', false, false],
    ['accept', '*/*', false, false]
  ]
  for (const trustProxy of [false, true]) {
    for (const [name, value, untrusted, trusted] of rows) {
      const dropped = trustProxy ? trusted : untrusted
      const out = upstreamHeaders({ [name]: value }, ctx({ trustProxy }))
      tt.equal(name in out, !dropped, `${name} ${dropped ? 'dropped' : 'kept'}${trustProxy ? ' (trusted peer)' : ''}`)
      if (!['connection', 'upgrade', 'te', 'trailer', 'transfer-encoding', 'keep-alive', 'proxy-connection', 'proxy-authorization'].includes(name)) {
        tt.equal(name in upstreamWsHeaders({ [name]: value }, ctx({ trustProxy })), !dropped, `${name} on the WebSocket path`)
      }
    }
  }
})

t.test('request direction: the names the client\'s Connection lists are dropped, but never the gateway\'s own', async (tt) => {
  const out = upstreamHeaders({
    connection: 'Upgrade, X-Client-Hop ,, COOKIE, x-user-sub, x-real-ip, x-request-id, x-forwarded-for',
    'x-client-hop': 'secret',
    cookie: 'a=1',
    'x-normal': 'kept'
  }, ctx())
  tt.notOk('connection' in out)
  tt.notOk('x-client-hop' in out)
  tt.notOk('cookie' in out, 'any name, case-insensitive')
  tt.equal(out['x-normal'], 'kept')
  tt.equal(out['x-user-sub'], 'f3a1-user', 'identity still set')
  tt.equal(out['x-real-ip'], '203.0.113.7')
  tt.equal(out['x-request-id'], 'req-1')
  tt.equal(out['x-forwarded-for'], '10.1.2.3')
  const ws = upstreamWsHeaders({ connection: 'Upgrade, X-Client-Hop', 'x-client-hop': 'secret', upgrade: 'websocket' }, ctx())
  tt.notOk('x-client-hop' in ws, 'WebSocket path too')
})

t.test('request direction: X-Real-IP is the client address the gateway derived (TRUST_PROXY honoured)', async (tt) => {
  tt.equal(upstreamHeaders({ 'x-real-ip': '6.6.6.6' }, ctx())['x-real-ip'], '203.0.113.7')
  tt.equal(upstreamHeaders({ 'x-real-ip': '6.6.6.6' }, ctx({ trustProxy: true, clientIp: '198.51.100.1' }))['x-real-ip'], '198.51.100.1')
  tt.equal(upstreamHeaders({}, ctx({ identity: null }))['x-real-ip'], '203.0.113.7', 'also without an identity (public paths)')
})

t.test('response direction: rewriteDownstreamHeaders drops the app\'s hop-by-hop headers, keeps the rest', async (tt) => {
  const rows: Array<[string, Record<string, string | string[]>, string[]]> = [
    // what, the app's headers, the names left
    ['a Node app\'s defaults', { connection: 'keep-alive', 'keep-alive': 'timeout=5', 'content-type': 'text/plain', 'content-length': '2' }, ['content-type', 'content-length']],
    ['Connection: close', { connection: 'close', date: 'x' }, ['date']],
    ['names listed in Connection', { connection: 'keep-alive, X-App-Hop,  x-other ', 'x-app-hop': '1', 'x-other': '2', 'x-kept': '3' }, ['x-kept']],
    ['Connection as an array', { connection: ['close', 'X-App-Hop'], 'x-app-hop': '1', etag: '"e"' }, ['etag']],
    ['the rest of the list', { 'proxy-connection': 'keep-alive', te: 'trailers', trailer: 'x-sum', upgrade: 'h2c', 'proxy-authenticate': 'Basic', 'set-cookie': ['a=1', 'b=2'] }, ['set-cookie']],
    ['nothing to drop', { 'content-type': 'application/json', 'x-request-id': 'r' }, ['content-type', 'x-request-id']]
  ]
  for (const [what, headers, left] of rows) {
    const input = { ...headers }
    const out = rewriteDownstreamHeaders(input)
    tt.equal(out, input, `${what}: in place`)
    tt.strictSame(Object.keys(out).sort(), [...left].sort(), what)
    for (const name of left) tt.strictSame(out[name], headers[name], `${what}: ${name} unchanged`)
  }
})
