// Clients without a token cannot hold sockets or file descriptors: a denial with an unread body closes the
// connection, request/header/keep-alive deadlines really fire, one peer address cannot hold more than
// MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP connections that never authenticated, the whole listener holds at most
// MAX_CONNECTIONS, `Expect: 100-continue` is only answered with 100 once the request passed auth and limits, and a
// gateway with 300 file descriptors keeps serving valid users while one address tries to hold 275 sockets.
// Everything through real sockets (raw `net` where the bytes on the wire matter).
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import http from 'node:http'
import net from 'node:net'
import tls from 'node:tls'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import WebSocket from 'ws'
import pino from 'pino'
import { loadConfig } from '../src/config/load.js'
import { LiveConfig } from '../src/config/live.js'
import {
  autoMaxConnections, connectionsCheckingInterval, effectiveMaxConnections, FALLBACK_MAX_CONNECTIONS, FD_RESERVE, MIN_AUTO_CONNECTIONS, parseNofile, readNofile,
  UnauthenticatedConnections
} from '../src/limits/connections.js'
import { proxyTrust, trustedPeer } from '../src/auth/transport.js'
import { AuthFailureLimiter } from '../src/limits/auth-failures.js'
import type { TestIssuer } from './helpers/issuer.js'
import type { TestUpstream } from './helpers/upstream.js'
import { baseEnv, selfSignedCert, startBackends, startGateway, writeYaml, type TestGateway } from './helpers/gateway.js'
import { freePort } from './helpers/ports.js'
import { ENTRY, ensureBuilt, spawnGateway } from './helpers/process.js'
import { metric, until, within } from './helpers/wait.js'

const LOOPBACK = '127.0.0.1'
/** A declared body length no test ever sends. */
const HUGE = 1_000_000_000

interface RawResponse { status: number, headers: Record<string, string>, body: string }

/**
 * A raw client connection: what the gateway writes is kept byte for byte, responses are parsed one after the
 * other, and `closed` resolves (with ms since connect) when the gateway ends the connection.
 */
const openRaw = new Set<Raw>()
// Whatever a test leaves open (a failed assertion included) must not keep the gateway from closing.
t.afterEach(() => { for (const c of openRaw) c.destroy() })

class Raw {
  readonly socket: net.Socket
  readonly opened = Date.now()
  /** Everything received, never consumed (for "no 100 Continue on the wire" checks). */
  wire = ''
  private pending = Buffer.alloc(0)
  closedAfter: number | undefined
  readonly closed: Promise<number>
  private dribbler: NodeJS.Timeout | undefined

  constructor (readonly port: number, opts: { localAddress?: string, secure?: boolean } = {}) {
    const base = { host: LOOPBACK, port, localAddress: opts.localAddress }
    this.socket = opts.secure === true ? tls.connect({ ...base, rejectUnauthorized: false }) : net.connect(base)
    this.socket.on('data', (d: Buffer) => {
      this.wire += d.toString('latin1')
      this.pending = Buffer.concat([this.pending, d])
    })
    this.socket.on('error', () => {})
    openRaw.add(this)
    this.closed = new Promise((resolve) => this.socket.once('close', () => {
      openRaw.delete(this)
      this.closedAfter = Date.now() - this.opened
      clearInterval(this.dribbler)
      resolve(this.closedAfter)
    }))
  }

  get isClosed (): boolean { return this.closedAfter !== undefined }

  async ready (): Promise<this> {
    await within(new Promise<void>((resolve, reject) => {
      if (this.isClosed) { reject(new Error('closed before connecting')); return }
      this.socket.once(this.socket instanceof tls.TLSSocket ? 'secureConnect' : 'connect', () => resolve())
      this.socket.once('close', () => reject(new Error('closed before connecting')))
    }), 3000, 'connect')
    return this
  }

  write (s: string): void { if (!this.isClosed) this.socket.write(s) }

  /** Writes `chunk` every `ms` until the connection closes (or stop()). */
  dribble (chunk: string, ms: number): void {
    this.dribbler = setInterval(() => this.write(chunk), ms)
  }

  /**
   * Sends the head of a POST declaring `length` body bytes (`headers`: whole lines), then the body one byte every
   * 100 ms, never finishing it (until the connection closes or stop()).
   */
  postDribbling (path: string, headers = '', length = HUGE): void {
    this.write(`POST ${path} HTTP/1.1\r\nHost: gw\r\n${headers}Content-Length: ${length}\r\n\r\na`)
    this.dribble('b', 100)
  }

  stop (): void { clearInterval(this.dribbler) }
  destroy (): void { this.stop(); this.socket.destroy() }

  /** The next complete response (a 1xx included); rejects after `ms` or when the connection closed without one. */
  async response (ms = 3000): Promise<RawResponse> {
    let parsed: RawResponse | undefined
    await until(() => {
      parsed = this.take()
      return parsed !== undefined || this.isClosed
    }, ms, `a response (received so far: ${JSON.stringify(this.wire.slice(0, 200))})`)
    parsed ??= this.take()
    if (parsed === undefined) throw new Error(`connection closed without a response (received: ${JSON.stringify(this.wire.slice(0, 200))})`)
    return parsed
  }

  private take (): RawResponse | undefined {
    const end = this.pending.indexOf('\r\n\r\n')
    if (end === -1) return undefined
    const [statusLine = '', ...lines] = this.pending.subarray(0, end).toString('latin1').split('\r\n')
    const headers: Record<string, string> = {}
    for (const l of lines) {
      const i = l.indexOf(':')
      headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim()
    }
    const status = Number(statusLine.split(' ')[1])
    let at = end + 4
    let body = ''
    if (status >= 200 && headers['transfer-encoding'] === 'chunked') {
      for (;;) {
        const eol = this.pending.indexOf('\r\n', at)
        if (eol === -1) return undefined
        const size = parseInt(this.pending.subarray(at, eol).toString('latin1'), 16)
        if (this.pending.length < eol + 2 + size + 2) return undefined
        body += this.pending.subarray(eol + 2, eol + 2 + size).toString('utf8')
        at = eol + 2 + size + 2
        if (size === 0) break
      }
    } else {
      const length = status < 200 ? 0 : Number(headers['content-length'] ?? 0)
      if (this.pending.length < at + length) return undefined
      body = this.pending.subarray(at, at + length).toString('utf8')
      at += length
    }
    this.pending = this.pending.subarray(at)
    return { status, headers, body }
  }
}

async function raw (port: number, opts: { localAddress?: string, secure?: boolean } = {}): Promise<Raw> {
  return await new Raw(port, opts).ready()
}

/** A connection the gateway refuses is closed at once, before any byte of a response. */
async function refused (port: number, localAddress: string, secure = false): Promise<number> {
  const c = new Raw(port, { localAddress, secure })
  const after = await within(c.closed, 2000, `connection from ${localAddress} closed`)
  if (c.wire !== '') throw new Error(`a refused connection got bytes: ${JSON.stringify(c.wire.slice(0, 100))}`)
  return after
}

const portOf = (g: TestGateway): number => Number(new URL(g.url).port)

/** startGateway, and client sockets a failed test left open are destroyed before the gateway closes (teardowns run last first). */
async function gateway (t: Test, issuer: TestIssuer, upstream: TestUpstream, opts: Parameters<typeof startGateway>[3] = {}): Promise<TestGateway> {
  const g = await startGateway(t, issuer, upstream, opts)
  t.teardown(() => { for (const c of openRaw) c.destroy() })
  return g
}

const ROLE_YAML = `
auth:
  routes:
    - path: /admin/**
      roles: [admin]
rateLimit:
  routes:
    - path: /limited/**
      max: 1
      window: 1m
`

t.test('a denial with an unread body closes the connection; keep-alive stays for the rest', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await gateway(t, issuer, upstream, { yaml: ROLE_YAML })
  const port = portOf(g)
  const token = await issuer.token({ sub: 'keepalive-user' })
  const limited = await issuer.token({ sub: 'limited-user' })

  t.test('401 to a token-less POST declaring 1 GB, while the client is still dribbling', async (t) => {
    const c = await raw(port)
    c.postDribbling('/api/x')
    const res = await c.response()
    t.equal(res.status, 401)
    t.equal(res.headers.connection, 'close', 'Connection: close')
    const after = await within(c.closed, 2000, 'the gateway closes the socket')
    t.ok(after < 2000, `closed ${after} ms after connect, dribbling all along`)
  })

  t.test('same for a chunked body', async (t) => {
    const c = await raw(port)
    c.write('POST /api/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n')
    c.dribble('1\r\nb\r\n', 100)
    const res = await c.response()
    t.equal(res.status, 401)
    t.equal(res.headers.connection, 'close')
    await within(c.closed, 2000, 'closed')
  })

  t.test('every gateway 400 and 401 closes, even without a body', async (t) => {
    const c = await raw(port)
    c.write('GET /api/x HTTP/1.1\r\nHost: gw\r\n\r\n')
    t.equal((await c.response()).headers.connection, 'close', '401 without a body')
    await within(c.closed, 2000, 'closed after the 401')
    const d = await raw(port)
    d.write(`GET /admin/%zz HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\n\r\n`)
    const bad = await d.response()
    t.equal(bad.status, 400, 'invalid_path')
    t.equal(bad.headers.connection, 'close')
    await within(d.closed, 2000, 'closed after the 400')
  })

  t.test('403 with an unread body closes; 403 without a body keeps the connection', async (t) => {
    const c = await raw(port)
    c.postDribbling('/admin/x', `Authorization: Bearer ${token}\r\n`)
    const res = await c.response()
    t.equal(res.status, 403)
    t.equal(res.headers.connection, 'close')
    await within(c.closed, 2000, 'closed after the 403 with an unread body')

    const k = await raw(port)
    k.write(`GET /admin/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\n\r\n`)
    const forbidden = await k.response()
    t.equal(forbidden.status, 403)
    t.not(forbidden.headers.connection, 'close')
    k.write(`GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\n\r\n`)
    t.equal((await k.response()).status, 200, 'the same connection serves the next request')
    t.notOk(k.isClosed)
    k.destroy()
  })

  t.test('429: closes with an unread body, keeps the connection without one', async (t) => {
    const c = await raw(port)
    c.write(`GET /limited/a HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${limited}\r\n\r\n`)
    t.equal((await c.response()).status, 200, 'the one allowed request')
    c.write(`GET /limited/a HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${limited}\r\n\r\n`)
    const over = await c.response()
    t.equal(over.status, 429)
    t.not(over.headers.connection, 'close', '429 without a body keeps the connection')
    c.postDribbling('/limited/a', `Authorization: Bearer ${limited}\r\n`)
    const overWithBody = await c.response()
    t.equal(overWithBody.status, 429)
    t.equal(overWithBody.headers.connection, 'close')
    await within(c.closed, 2000, 'closed after the 429 with an unread body')
  })

  t.test('successful requests keep the connection alive, bodies included', async (t) => {
    const c = await raw(port)
    for (let i = 0; i < 3; i++) {
      c.write(`POST /echo HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\nContent-Length: 5\r\n\r\nhello`)
      const res = await c.response()
      t.equal(res.status, 200)
      t.equal(res.body, 'hello')
      t.not(res.headers.connection, 'close')
    }
    t.notOk(c.isClosed)
    c.destroy()
  })
})

t.test('a text/plain body is streamed to the app like any other, beyond 1 MiB too', async (t) => {
  // Fastify's own text/plain parser would read it whole before the limits (and before a 100 Continue).
  const { issuer, upstream } = await startBackends(t)
  const g = await gateway(t, issuer, upstream)
  const token = await issuer.token({ sub: 'text-user' })
  const body = 'x'.repeat(3 * 1024 * 1024)
  const res = await fetch(`${g.url}/echo`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain' }, body })
  t.equal(res.status, 200)
  t.equal((await res.text()).length, body.length, 'echoed whole')
  t.equal(upstream.requests[0]?.body.length, body.length, 'the app got all of it')
})

t.test('request, header and keep-alive deadlines fire', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await gateway(t, issuer, upstream, { env: { HEADERS_TIMEOUT: '500ms', REQUEST_TIMEOUT: '1500ms', KEEP_ALIVE_TIMEOUT: '800ms' } })
  const port = portOf(g)
  const token = await issuer.token({ sub: 'slow-user' })

  t.test('dribbled headers: closed after ~HEADERS_TIMEOUT', async (t) => {
    const c = await raw(port)
    c.write('GET /api/x HTTP/1.1\r\n')
    c.dribble('X-A: b\r\n', 100)
    const after = await within(c.closed, 4000, 'closed')
    t.ok(after >= 400 && after < 2000, `closed after ${after} ms (headersTimeout 500 ms)`)
  })

  t.test('a connection that sends nothing: closed after ~HEADERS_TIMEOUT', async (t) => {
    const c = await raw(port)
    const after = await within(c.closed, 4000, 'closed')
    t.ok(after >= 400 && after < 2000, `closed after ${after} ms`)
  })

  t.test('an authenticated request dribbling its body: closed after ~REQUEST_TIMEOUT', async (t) => {
    const c = await raw(port)
    c.postDribbling('/echo', `Authorization: Bearer ${token}\r\n`, 100_000)
    const after = await within(c.closed, 5000, 'closed')
    t.ok(after >= 1300 && after < 3500, `closed after ${after} ms (requestTimeout 1500 ms)`)
  })

  t.test('an idle keep-alive connection: closed after ~KEEP_ALIVE_TIMEOUT', async (t) => {
    const c = await raw(port)
    c.write(`GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\n\r\n`)
    t.equal((await c.response()).status, 200)
    const answered = Date.now()
    await within(c.closed, 4000, 'closed')
    const idle = Date.now() - answered
    t.ok(idle >= 600 && idle < 2500, `closed ${idle} ms after the answer (keepAliveTimeout 800 ms)`)
  })
})

t.test('per-address and global connection caps', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await gateway(t, issuer, upstream, {
    env: { MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: '4', MAX_CONNECTIONS: '12', HEADERS_TIMEOUT: '30s', REQUEST_TIMEOUT: '30s' }
  })
  const port = portOf(g)
  const token = await issuer.token({ sub: 'cap-user' })
  const open = async (): Promise<number> => await metric(g, 'resonance_connections_open')
  const refusedBy = async (reason: string): Promise<number> => await metric(g, `resonance_connections_refused_total{reason="${reason}"}`)
  const held: Raw[] = []
  t.teardown(() => { for (const c of held) c.destroy() })
  const hold = async (localAddress: string): Promise<Raw> => {
    const c = await raw(port, { localAddress })
    held.push(c)
    return c
  }

  const silent: Raw[] = []
  for (let i = 0; i < 4; i++) silent.push(await hold('127.0.0.2'))
  await until(async () => await open() === 4, 2000, 'the gateway counts 4 open connections')
  t.ok(await refused(port, '127.0.0.2') < 2000, 'the 5th unauthenticated connection from 127.0.0.2 is closed at once')
  t.equal(await refusedBy('per_ip'), 1, 'counted as refused per_ip')
  t.notOk(silent.some((c) => c.isClosed), 'the first 4 stay open')

  const other = await hold('127.0.0.3')
  await until(async () => await open() === 5, 2000, 'another address is not affected')
  t.notOk(other.isClosed)

  // A connection that carried an authenticated request no longer counts against its address.
  silent[0]?.destroy()
  await until(async () => await open() === 4, 2000, 'one closed')
  const authed = await hold('127.0.0.2')
  authed.write(`GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\n\r\n`)
  t.equal((await authed.response()).status, 200)
  const again = await hold('127.0.0.2')
  await until(async () => await open() === 6, 2000, 'admitted: the authenticated one no longer counts')
  t.notOk(again.isClosed)
  await refused(port, '127.0.0.2')
  t.equal(await refusedBy('per_ip'), 2)

  // An authenticated WebSocket does not count either.
  const ws = new WebSocket(`${g.wsUrl}/ws/resonance`, { headers: { authorization: `Bearer ${token}` }, localAddress: '127.0.0.4' })
  t.teardown(() => ws.terminate())
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  for (let i = 0; i < 4; i++) await hold('127.0.0.4')
  await until(async () => await open() === 11, 2000, '4 more from 127.0.0.4 next to its WebSocket')
  t.equal(await refusedBy('per_ip'), 2, 'none refused')

  // Global: 11 open, the 12th is admitted, the 13th dropped whatever its address.
  await hold('127.0.0.5')
  await until(async () => await open() === 12, 2000, '12 open')
  await refused(port, '127.0.0.6')
  t.equal(await refusedBy('global'), 1, 'counted as refused global')
  await refused(port, LOOPBACK)
  t.equal(await refusedBy('global'), 2, 'at the global cap valid users are refused too, until a slot is free')
  held.pop()?.destroy()
  await until(async () => await open() === 11, 2000, 'one slot free')
  const next = await hold(LOOPBACK)
  next.write(`GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\n\r\n`)
  t.equal((await next.response()).status, 200, 'served again once a slot is free')
})

t.test('TLS listener: caps and deadlines apply too', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const { cert, key } = selfSignedCert()
  const g = await gateway(t, issuer, upstream, {
    env: { TLS_CERT: cert, TLS_KEY: key, ALLOW_INSECURE_HTTP: 'false', MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: '2', HEADERS_TIMEOUT: '700ms', REQUEST_TIMEOUT: '2s' }
  })
  const port = portOf(g)
  const token = await issuer.token({ sub: 'tls-cap-user' })
  const authed = await raw(port, { localAddress: '127.0.0.7', secure: true })
  t.teardown(() => authed.destroy())
  authed.write(`GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\n\r\n`)
  t.equal((await authed.response()).status, 200, 'authenticated over TLS')
  const a = await raw(port, { localAddress: '127.0.0.7', secure: true })
  const b = await raw(port, { localAddress: '127.0.0.7', secure: true })
  await until(async () => await metric(g, 'resonance_connections_open') === 3, 2000, '3 open')
  await refused(port, '127.0.0.7', true)
  t.equal(await metric(g, 'resonance_connections_refused_total{reason="per_ip"}'), 1, 'the third unauthenticated TLS connection is refused')
  const afterA = await within(a.closed, 4000, 'an idle TLS connection closes after HEADERS_TIMEOUT')
  t.ok(afterA < 2500, `closed after ${afterA} ms (headersTimeout 700 ms)`)
  b.destroy()
})

t.test('per-address cap and TRUST_PROXY: a trusted proxy is not capped; any other peer is, as before', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const token = await issuer.token({ sub: 'trusted-cap-user' })
  interface Capped { port: number, open: () => Promise<number>, refusedBy: (reason: string) => Promise<number>, hold: (localAddress: string) => Promise<Raw> }
  /** A gateway with per-address cap 4 and global cap 16 (idle sockets stay: 30 s for headers), and what the tests ask it. */
  const capped = async (t: Test, trustProxy: string): Promise<Capped> => {
    const g = await gateway(t, issuer, upstream, {
      env: { TRUST_PROXY: trustProxy, MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: '4', MAX_CONNECTIONS: '16', HEADERS_TIMEOUT: '30s', REQUEST_TIMEOUT: '30s' }
    })
    const held: Raw[] = []
    t.teardown(() => { for (const c of held) c.destroy() })
    return {
      port: portOf(g),
      open: async () => await metric(g, 'resonance_connections_open'),
      refusedBy: async (reason) => await metric(g, `resonance_connections_refused_total{reason="${reason}"}`),
      hold: async (localAddress) => {
        const c = await raw(portOf(g), { localAddress })
        held.push(c)
        return c
      }
    }
  }

  t.test('TRUST_PROXY=127.0.0.1: 12 token-less connections in flight at once from it are all accepted', async (t) => {
    const { port, open, refusedBy, hold } = await capped(t, LOOPBACK)
    const storm = await Promise.all(Array.from({ length: 12 }, async () => await hold(LOOPBACK)))
    await until(async () => await open() === 12, 2000, 'the gateway counts 12 open connections')
    t.equal(await refusedBy('per_ip'), 0, 'none refused per_ip (cap 4)')
    t.notOk(storm.some((c) => c.isClosed), 'all 12 stay open')
    storm[0]?.write('GET /api/x HTTP/1.1\r\nHost: gw\r\n\r\n')
    t.equal((await storm[0]?.response())?.status, 401, 'a token-less request through the proxy is still refused (401)')

    // An untrusted address next to it keeps its cap of 4.
    for (let i = 0; i < 4; i++) await hold('127.0.0.2')
    await until(async () => await open() === 15, 2000, '4 more from 127.0.0.2 (the 401 closed one)')
    await refused(port, '127.0.0.2')
    t.equal(await refusedBy('per_ip'), 1, 'the 5th from 127.0.0.2 is refused per_ip')

    // The trusted proxy's connections count towards MAX_CONNECTIONS (16).
    await hold(LOOPBACK)
    await until(async () => await open() === 16, 2000, '16 open')
    await refused(port, LOOPBACK)
    t.equal(await refusedBy('global'), 1, 'the 17th, from the trusted proxy, is refused by the global cap')
    t.equal(await refusedBy('per_ip'), 1, 'not per_ip')
  })

  t.test('TRUST_PROXY=10.0.0.1: 127.0.0.1 is capped at 4 exactly as without it', async (t) => {
    const { port, open, refusedBy, hold } = await capped(t, '10.0.0.1')
    const silent: Raw[] = []
    for (let i = 0; i < 4; i++) silent.push(await hold(LOOPBACK))
    await until(async () => await open() === 4, 2000, 'the gateway counts 4 open connections')
    t.ok(await refused(port, LOOPBACK) < 2000, 'the 5th unauthenticated connection from 127.0.0.1 is closed at once')
    t.equal(await refusedBy('per_ip'), 1, 'counted as refused per_ip')
    t.notOk(silent.some((c) => c.isClosed), 'the first 4 stay open')

    // As before: a connection that authenticated no longer counts, and the cap holds for the rest.
    silent[0]?.write(`GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${token}\r\n\r\n`)
    t.equal((await silent[0]?.response())?.status, 200)
    await hold(LOOPBACK)
    await until(async () => await open() === 5, 2000, 'admitted: the authenticated one no longer counts')
    await refused(port, LOOPBACK)
    t.equal(await refusedBy('per_ip'), 2)
  })
})

t.test('Expect: 100-continue', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await gateway(t, issuer, upstream, { yaml: ROLE_YAML })
  const port = portOf(g)
  const token = await issuer.token({ sub: 'expect-user' })
  const limited = await issuer.token({ sub: 'expect-limited' })
  const expectPost = (path: string, headers = ''): string =>
    `POST ${path} HTTP/1.1\r\nHost: gw\r\n${headers}Content-Type: text/plain\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n`

  for (const [name, path, headers, status] of [
    ['no token', '/echo', '', 401],
    ['missing role', '/admin/x', `Authorization: Bearer ${token}\r\n`, 403]
  ] as const) {
    t.test(`denied (${name}): the denial, never 100 Continue`, async (t) => {
      const c = await raw(port)
      c.write(expectPost(path, headers))
      const res = await c.response()
      t.equal(res.status, status)
      await within(c.closed, 2000, 'closed: the client may still send the body')
      t.notMatch(c.wire, /100 Continue/i, 'no 100 on the wire')
    })
  }

  t.test('denied (rate limit): 429, never 100 Continue', async (t) => {
    const c = await raw(port)
    c.write(`GET /limited/a HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ${limited}\r\n\r\n`)
    t.equal((await c.response()).status, 200)
    c.write(expectPost('/limited/a', `Authorization: Bearer ${limited}\r\n`))
    t.equal((await c.response()).status, 429)
    await within(c.closed, 2000, 'closed')
    t.notMatch(c.wire, /100 Continue/i)
  })

  t.test('allowed: 100 Continue, then the body reaches the app', async (t) => {
    upstream.reset()
    const c = await raw(port)
    c.write(expectPost('/echo', `Authorization: Bearer ${token}\r\n`))
    const cont = await c.response()
    t.equal(cont.status, 100, '100 Continue first')
    t.equal(upstream.requests.length, 0, 'nothing reached the app before the body was sent')
    c.write('hello')
    const res = await c.response()
    t.equal(res.status, 200)
    t.equal(res.body, 'hello')
    t.equal(upstream.requests[0]?.body.toString(), 'hello', 'the app got the body')
    t.equal(upstream.requests[0]?.headers.expect, undefined, 'the app never sees Expect')
    c.destroy()
  })

  t.test('allowed through an HTTP client that waits for 100', async (t) => {
    upstream.reset()
    const res = await new Promise<{ status: number, body: string, continued: boolean }>((resolve, reject) => {
      let continued = false
      const req = http.request({ host: LOOPBACK, port, path: '/echo', method: 'POST', agent: false, headers: { authorization: `Bearer ${token}`, expect: '100-continue', 'content-length': '3' } })
      req.on('continue', () => { continued = true; req.end('abc') })
      req.on('response', (r) => {
        let body = ''
        r.setEncoding('utf8')
        r.on('data', (d: string) => { body += d })
        r.on('end', () => resolve({ status: r.statusCode ?? 0, body, continued }))
      })
      req.on('error', reject)
      req.flushHeaders()
    })
    t.ok(res.continued)
    t.equal(res.status, 200)
    t.equal(res.body, 'abc')
  })
})

t.test('configuration', async (t) => {
  const base = { JWT_ISSUER: 'https://id.example.com/realms/r', JWT_AUDIENCE: 'gw', CONFIG_FILE: '/nonexistent-default-is-not-used' }
  const load = (env: Record<string, string>): ReturnType<typeof loadConfig> => loadConfig({ env: { ...base, CONFIG_FILE: writeYaml(''), ...env } })

  const d = load({}).server as unknown as Record<string, unknown>
  t.equal(d.requestTimeoutMs, 60_000, 'requestTimeout default 60 s')
  t.equal(d.headersTimeoutMs, 10_000, 'headersTimeout default 10 s')
  t.equal(d.keepAliveTimeoutMs, 72_000, 'keepAliveTimeout default 72 s')
  t.equal(d.maxConnections, 0, 'maxConnections default 0 (auto)')
  t.equal(d.maxUnauthenticatedPerIp, 64, 'maxUnauthenticatedPerIp default 64')

  const fromYaml = loadConfig({
    env: { ...base, CONFIG_FILE: writeYaml('server:\n  requestTimeout: 30s\n  headersTimeout: 5s\n  keepAliveTimeout: 1m\n  maxConnections: 500\n  maxUnauthenticatedPerIp: 0\n') }
  }).server as unknown as Record<string, unknown>
  t.match(fromYaml, { requestTimeoutMs: 30_000, headersTimeoutMs: 5000, keepAliveTimeoutMs: 60_000, maxConnections: 500, maxUnauthenticatedPerIp: 0 }, 'YAML keys')
  const fromEnv = load({ REQUEST_TIMEOUT: '2s', HEADERS_TIMEOUT: '2s', KEEP_ALIVE_TIMEOUT: '5000', MAX_CONNECTIONS: '100', MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: '8' }).server as unknown as Record<string, unknown>
  t.match(fromEnv, { requestTimeoutMs: 2000, headersTimeoutMs: 2000, keepAliveTimeoutMs: 5000, maxConnections: 100, maxUnauthenticatedPerIp: 8 }, 'env (headersTimeout may equal requestTimeout)')

  const rows: Array<[string, Record<string, string>, RegExp]> = [
    ['headersTimeout above requestTimeout (env)', { HEADERS_TIMEOUT: '20s', REQUEST_TIMEOUT: '10s' }, /server\.headersTimeout \(HEADERS_TIMEOUT\): must not be longer than server\.requestTimeout \(REQUEST_TIMEOUT/],
    ['headersTimeout above the default requestTimeout', { HEADERS_TIMEOUT: '2m' }, /server\.headersTimeout \(HEADERS_TIMEOUT\)/],
    ['requestTimeout not a duration', { REQUEST_TIMEOUT: 'soon' }, /server\.requestTimeout \(REQUEST_TIMEOUT\): must be a duration/],
    ['requestTimeout 0', { REQUEST_TIMEOUT: '0' }, /server\.requestTimeout \(REQUEST_TIMEOUT\)/],
    ['keepAliveTimeout 0', { KEEP_ALIVE_TIMEOUT: '0' }, /server\.keepAliveTimeout \(KEEP_ALIVE_TIMEOUT\)/],
    ['maxConnections negative', { MAX_CONNECTIONS: '-1' }, /server\.maxConnections \(MAX_CONNECTIONS\): must be an integer/],
    ['per-IP cap not a number', { MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: 'many' }, /server\.maxUnauthenticatedPerIp \(MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP\): must be an integer/]
  ]
  for (const [name, env, re] of rows) {
    t.throws(() => load(env), re, name)
  }
  t.throws(() => loadConfig({ env: { ...base, CONFIG_FILE: writeYaml('server:\n  requestTimeout: 4s\n  headersTimeout: 5s\n') } }),
    /server\.headersTimeout \(HEADERS_TIMEOUT\): must not be longer than server\.requestTimeout/, 'the same from YAML')

  // Listener settings need a restart: a reload keeps them and says so.
  const env: Record<string, string> = { ...base, CONFIG_FILE: writeYaml('') }
  const live = new LiveConfig(loadConfig({ env }), env)
  env.REQUEST_TIMEOUT = '30s'
  env.MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP = '8'
  const reloaded = live.reload(pino({ level: 'silent' }) as never)
  t.strictSame(reloaded.restartNeeded, ['server.requestTimeout', 'server.maxUnauthenticatedPerIp'], 'a reload names the listener settings that need a restart')
  t.equal(live.current.server.requestTimeoutMs, 60_000, 'and keeps the values in force')
  t.equal(live.current.server.maxUnauthenticatedPerIp, 64)
})

t.test('connection budget: pure logic', async (t) => {
  const limits = `Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
`
  t.equal(parseNofile(limits), 1024, 'the soft limit')
  t.equal(parseNofile(limits.replace('1024                 524288', 'unlimited            unlimited')), undefined, 'unlimited: none')
  t.equal(parseNofile('nothing here'), undefined)
  t.equal(readNofile('/nonexistent/limits'), undefined, 'unreadable: none')
  if (existsSync('/proc/self/limits')) t.type(readNofile(), 'number', 'this process on Linux')

  t.equal(autoMaxConnections(300, 16), Math.floor((300 - 16 - FD_RESERVE) / 2), '(nofile - upstream pool - reserve) / 2')
  t.equal(autoMaxConnections(300, 16), 110)
  t.equal(autoMaxConnections(1_048_576, 128), 524_192)
  t.equal(autoMaxConnections(100, 128), MIN_AUTO_CONNECTIONS, 'never below the minimum')
  t.strictSame(effectiveMaxConnections(500, 128, 300), { max: 500, source: 'config', nofile: 300 }, 'a configured cap wins')
  t.strictSame(effectiveMaxConnections(0, 128, 1024), { max: 416, source: 'auto', nofile: 1024 })
  t.strictSame(effectiveMaxConnections(0, 128, undefined), { max: FALLBACK_MAX_CONNECTIONS, source: 'fallback', nofile: undefined })

  const u = new UnauthenticatedConnections(2)
  t.ok(u.tryAdd('a'))
  t.ok(u.tryAdd('a'))
  t.notOk(u.tryAdd('a'), 'the third from one key is refused')
  t.equal(u.count('a'), 2, 'and not counted')
  t.ok(u.tryAdd('b'), 'another key is not affected')
  u.remove('a')
  t.ok(u.tryAdd('a'), 'room again after one left')
  u.remove('a')
  u.remove('a')
  u.remove('b')
  t.equal(u.size, 0, 'entries are removed at zero (bounded memory)')
  u.remove('never-added')
  t.equal(u.size, 0, 'removing an unknown key is harmless')

  // The key is the one the auth-failure limit uses: IPv6 by /64, IPv4-mapped addresses as IPv4.
  t.equal(AuthFailureLimiter.clientKey('2001:db8:1:2:aaaa::1'), AuthFailureLimiter.clientKey('2001:db8:1:2:bbbb::2'), 'one /64, one key')
  t.not(AuthFailureLimiter.clientKey('2001:db8:1:2::1'), AuthFailureLimiter.clientKey('2001:db8:1:3::1'))
  t.equal(AuthFailureLimiter.clientKey('::ffff:192.0.2.7'), '192.0.2.7')

  // Trusted peers (exempt from the per-address cap): hop 0 of the trust function Fastify is given.
  const listed = proxyTrust(['127.0.0.1', '10.0.0.0/8', '2001:db8::/32'])
  t.ok(trustedPeer(listed, '127.0.0.1'), 'a listed address')
  t.ok(trustedPeer(listed, '::ffff:127.0.0.1'), 'the same, IPv4-mapped (a dual-stack listener)')
  t.ok(trustedPeer(listed, '10.200.0.9'), 'an address in a listed CIDR')
  t.ok(trustedPeer(listed, '2001:db8:5::1'), 'an IPv6 address in a listed CIDR')
  t.notOk(trustedPeer(listed, '127.0.0.2'), 'an address not listed')
  t.notOk(trustedPeer(proxyTrust(false), '127.0.0.1'), 'TRUST_PROXY=false: no peer')
  t.ok(trustedPeer(proxyTrust(true), '203.0.113.9'), 'TRUST_PROXY=true: every peer')
  t.ok(trustedPeer(proxyTrust(1), '203.0.113.9'), 'a hop count: every peer (the first trusted hop)')

  t.equal(connectionsCheckingInterval(10_000), 1000, 'deadlines checked every second by default')
  t.equal(connectionsCheckingInterval(500), 250, 'twice per headersTimeout when it is short')
  t.equal(connectionsCheckingInterval(100), 50)
})

let hasPrlimit = true
try { execFileSync('prlimit', ['--version'], { stdio: 'ignore' }) } catch { hasPrlimit = false }

t.test('a gateway with 300 file descriptors keeps serving valid users while one address attacks', {
  skip: hasPrlimit ? false : 'prlimit (util-linux) is not installed: cannot run the gateway with a file-descriptor limit'
}, async (t) => {
  ensureBuilt()
  t.ok(existsSync(ENTRY), 'dist/server.js built')
  const { issuer, upstream } = await startBackends(t)
  const port = await freePort()
  const adminPort = await freePort()

  // 300 descriptors: the attacker alone could take them all. UPSTREAM_CONNECTIONS=16 leaves the automatic global
  // cap at (300 - 16 - 64) / 2 = 110, so the per-address cap (default 64) is what stops the attacker.
  const p = spawnGateway(t, {
    ...baseEnv(issuer, upstream),
    UPSTREAM_CONNECTIONS: '16',
    PORT: String(port),
    ADMIN_PORT: String(adminPort),
    RATE_LIMIT_MAX: '1000000'
  }, { wrapper: ['prlimit', '--nofile=300:300'] })
  const out = (): string => p.stdout() + p.stderr()
  const adminGet = async (path: string): Promise<{ status: number, body: string }> => await new Promise((resolve) => {
    http.get({ host: LOOPBACK, port: adminPort, path, agent: false }, (r) => {
      let body = ''
      r.setEncoding('utf8').on('data', (c: string) => { body += c })
      r.on('end', () => resolve({ status: r.statusCode ?? 0, body }))
    }).on('error', () => resolve({ status: 0, body: '' }))
  })
  await until(async () => (await adminGet('/readyz')).status === 200, 20_000, () => `gateway ready; output:\n${out()}`)
  const token = await issuer.token({ sub: 'valid-under-attack' })

  // The attacker: 275 slots on 127.0.0.2, each reopening its connection (after 500 ms) whenever it is closed.
  // Even slots declare a 1 GB body without a token and dribble it; odd slots dribble their headers.
  const stats = { attempts: 0, answered: 0, closedSilently: 0, open: 0, maxOpen: 0 }
  const attackers = new Set<net.Socket>()
  let attacking = true
  const slot = (i: number): void => {
    if (!attacking) return
    stats.attempts++
    const s = net.connect({ host: LOOPBACK, port, localAddress: '127.0.0.2' })
    attackers.add(s)
    let timer: NodeJS.Timeout | undefined
    let gotBytes = false
    let connected = false
    s.on('connect', () => {
      connected = true
      stats.open++
      stats.maxOpen = Math.max(stats.maxOpen, stats.open)
      if (i % 2 === 0) {
        s.write(`POST /api/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: ${HUGE}\r\n\r\na`)
        timer = setInterval(() => s.write('a'), 1000)
      } else {
        s.write('GET /api/x HTTP/1.1\r\nHost: gw\r\n')
        timer = setInterval(() => s.write('X-Slow: 1\r\n'), 1000)
      }
    })
    s.on('data', () => { gotBytes = true })
    s.on('error', () => {})
    s.on('close', () => {
      clearInterval(timer)
      attackers.delete(s)
      if (connected) stats.open--
      if (gotBytes) stats.answered++
      else stats.closedSilently++
      setTimeout(() => slot(i), 500).unref()
    })
  }
  const stopAttack = (): void => {
    attacking = false
    for (const s of attackers) s.destroy()
  }
  t.teardown(stopAttack)
  for (let i = 0; i < 275; i++) slot(i)
  await until(() => stats.attempts >= 275, 5000, 'the attack is under way')
  await sleep(1500) // let the attacker reach its steady state (time-based by nature: slots reopen 500 ms after a close)

  // Valid traffic from 127.0.0.1 during the attack: 6 keep-alive clients, GETs and POSTs, for 8 s.
  const agent = new http.Agent({ keepAlive: true, maxSockets: 6, localAddress: LOOPBACK })
  t.teardown(() => agent.destroy())
  const statuses = new Map<string, number>()
  const note = (k: string): void => { statuses.set(k, (statuses.get(k) ?? 0) + 1) }
  const call = async (method: string, path: string, body?: string): Promise<void> => {
    await new Promise<void>((resolve) => {
      const req = http.request({ host: LOOPBACK, port, path, method, agent, timeout: 5000, headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-length': String(Buffer.byteLength(body)) } : {}) } }, (res) => {
        res.resume()
        res.on('end', () => { note(String(res.statusCode)); resolve() })
      })
      req.on('timeout', () => req.destroy(new Error('timeout')))
      req.on('error', (err: NodeJS.ErrnoException) => { note(`error ${err.code ?? err.message}`); resolve() })
      req.end(body)
    })
  }
  const end = Date.now() + 8000
  await Promise.all(Array.from({ length: 6 }, async (_x, w) => {
    for (let n = 0; Date.now() < end; n++) {
      if ((n + w) % 2 === 0) await call('GET', `/api/x?w=${w}&n=${n}`)
      else await call('POST', '/echo', JSON.stringify({ w, n }))
    }
  }))
  const metricsText = (await adminGet('/metrics')).body
  stopAttack()

  const total = [...statuses.values()].reduce((a, b) => a + b, 0)
  if (statuses.size !== 1) t.comment(out().split('\n').filter((l) => /"level":(50|60)/.test(l)).slice(0, 3).join('\n'))
  t.strictSame([...statuses.keys()], ['200'], `every valid request got 200 (${JSON.stringify(Object.fromEntries(statuses))})`)
  t.ok(total >= 50, `${total} valid requests answered during the attack`)
  t.ok(stats.closedSilently > 0, `attacker connections refused at once: ${stats.closedSilently}`)
  t.ok(stats.answered > 0, `attacker connections answered and closed: ${stats.answered}`)
  t.comment(`attacker: ${JSON.stringify(stats)}`)
  const refusedPerIp = Number(/^resonance_connections_refused_total\{reason="per_ip"\} (\d+)/m.exec(metricsText)?.[1] ?? 0)
  t.ok(refusedPerIp > 0, `resonance_connections_refused_total{reason="per_ip"} = ${refusedPerIp}`)
  t.match(metricsText, /^resonance_upstream_errors_total\{kind="connect",transport="http"\} 0$/m, 'no failed connection to the app')
  t.notMatch(out(), /EMFILE/, 'the gateway never ran out of file descriptors')
  t.match(out(), /"maxConnections":110\b/, 'the automatic global cap is logged at start')
  t.equal(p.child.exitCode, null, 'the gateway is still running')
})
