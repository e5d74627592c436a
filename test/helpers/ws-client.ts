// The client side of WebSockets through the gateway (the `ws` package, real sockets): an upgrade that opens or is
// refused with an HTTP answer, a connection that collects what it receives, a round trip through the echo app.
import { randomUUID } from 'node:crypto'
import type { IncomingMessage } from 'node:http'
import WebSocket, { type ClientOptions } from 'ws'
import { until, within } from './wait.js'

interface Teardown { teardown (fn: () => unknown): void }

function joinHeaders (headers: IncomingMessage['headers']): Record<string, string | undefined> {
  const out: Record<string, string | undefined> = {}
  for (const [k, v] of Object.entries(headers)) out[k] = Array.isArray(v) ? v.join(', ') : v
  return out
}

export type WsOutcome =
  | { kind: 'open', status: 101, ws: WebSocket, protocol: string }
  /** `upgraded`: a 101 was seen before the refusal (never, for a refusal that is an HTTP answer). */
  | { kind: 'refused', status: number, headers: Record<string, string | undefined>, body: string, upgraded: boolean }

/**
 * Upgrades `url` and resolves with the open socket, or with the HTTP answer that refused it (status, headers, whole
 * body); rejects on a network error. The socket is terminated when `t` ends.
 */
export function upgrade (t: Teardown, url: string, opts: { protocols?: string[], headers?: Record<string, string>, handshakeTimeout?: number } = {}): Promise<WsOutcome> {
  const ws = new WebSocket(url, opts.protocols ?? [], {
    headers: opts.headers ?? {},
    ...(opts.handshakeTimeout !== undefined ? { handshakeTimeout: opts.handshakeTimeout } : {})
  })
  t.teardown(() => ws.terminate())
  let upgraded = false
  ws.on('upgrade', () => { upgraded = true })
  return new Promise((resolve, reject) => {
    ws.once('open', () => resolve({ kind: 'open', status: 101, ws, protocol: ws.protocol }))
    ws.once('unexpected-response', (_req, res: IncomingMessage) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        ws.on('error', () => {}) // terminate() during CONNECTING reports an error; expected here
        ws.terminate()
        resolve({ kind: 'refused', status: res.statusCode ?? 0, headers: joinHeaders(res.headers), body: Buffer.concat(chunks).toString('utf8'), upgraded })
      })
    })
    ws.once('error', reject)
  })
}

/** Sends `text` and resolves with the next message received (the echo app sends it back). */
export async function exchange (ws: WebSocket, text: string): Promise<string> {
  const reply = new Promise<string>((resolve) => ws.once('message', (d) => resolve(String(d))))
  ws.send(text)
  return await reply
}

export interface Closed { code: number, reason: string, at: number }

export interface Conn {
  ws: WebSocket
  path: string
  /** Every message the client received, as text (binary ones too). */
  texts: string[]
  closed: Promise<Closed>
}

/** Where the token travels: the Authorization header, ?access_token=, or the `bearer` subprotocol. */
export type Carrier = 'header' | 'query' | 'protocol'

/**
 * Opens a WebSocket through the gateway on a path of its own (`/ws/<uuid>` unless given), with `token` in a header
 * (default), the query or the subprotocol; rejects when the upgrade is refused or does not open within 5 s.
 */
export async function connect (g: { wsUrl: string }, token: string, opts: { path?: string, ws?: ClientOptions, collect?: boolean, carrier?: Carrier } = {}): Promise<Conn> {
  const path = opts.path ?? `/ws/${randomUUID()}`
  const carrier = opts.carrier ?? 'header'
  const url = `${g.wsUrl}${path}${carrier === 'query' ? `?access_token=${token}` : ''}`
  const ws = carrier === 'protocol'
    ? new WebSocket(url, ['bearer', token], { ...opts.ws })
    : new WebSocket(url, { ...(carrier === 'header' ? { headers: { authorization: `Bearer ${token}` } } : {}), ...opts.ws })
  const texts: string[] = []
  if (opts.collect !== false) ws.on('message', (d) => texts.push((d as Buffer).toString()))
  const closed = new Promise<Closed>((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString(), at: Date.now() })))
  await within(new Promise<void>((resolve, reject) => {
    ws.once('open', () => resolve())
    ws.once('error', reject)
    ws.once('unexpected-response', (_req, res: IncomingMessage) => { res.resume(); reject(new Error(`upgrade refused with ${res.statusCode}`)) })
  }), 5000, `upgrade of ${path} opens`)
  ws.on('error', () => {})
  return { ws, path, texts, closed }
}

export interface Refusal { status: number, headers: IncomingMessage['headers'], body: string, upgraded: boolean }

/** An upgrade (token in a header) that the gateway must refuse with an HTTP status, before any 101, within 5 s. */
export async function refusal (g: { wsUrl: string }, token: string, path = `/ws/${randomUUID()}`): Promise<Refusal> {
  const ws = new WebSocket(`${g.wsUrl}${path}`, { headers: { authorization: `Bearer ${token}` } })
  let upgraded = false
  ws.on('upgrade', () => { upgraded = true })
  return await within(new Promise<Refusal>((resolve, reject) => {
    ws.once('open', () => { ws.terminate(); reject(new Error('the upgrade was accepted')) })
    ws.once('unexpected-response', (_req, res: IncomingMessage) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => { body += c })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body, upgraded }))
    })
    ws.on('error', () => {})
  }), 5000, 'refusal')
}

/** Sends `text` and waits (3 s at most) until one more copy of it has come back from the echo app. */
export async function echo (c: Conn, text: string): Promise<void> {
  const n = c.texts.filter((x) => x === text).length
  c.ws.send(text)
  await until(() => c.texts.filter((x) => x === text).length > n, 3000, `echo of ${text}`)
}
