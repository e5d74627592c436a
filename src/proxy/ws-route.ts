/**
 * The upgrade side of the WebSocket relay, everything up to the 101:
 *   route constraint `upgrade: websocket`: the relay's routes take real
 *               handshakes only, never the HTTP proxy's requests;
 *   preHandler: a verified caller (ws-guard), a valid handshake, a connection
 *               slot (ws-gate), then the app-side handshake (an HTTP upgrade
 *               of our own, checked as a WebSocket client checks it), so the
 *               app's refusal (4xx) or absence (502/504) reaches the client as
 *               a status before any 101, and the client gets the app's
 *               subprotocol choice; then the gateway writes the client's 101
 *               itself and hands both sockets to the session (./ws-session.ts).
 */
import { randomBytes } from 'node:crypto'
import http from 'node:http'
import https from 'node:https'
import type { IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { GuardedSession, WsGuard } from '../auth/ws-guard.js'
import { appProtocols, BEARER_PROTOCOL, protocolsValid, protocolToken, stripQueryToken } from '../auth/token.js'
import { isWebSocketHandshake } from '../auth/transport.js'
import type { Metrics } from '../observability/metrics.js'
import type { Slot, WsLimits } from '../limits/ws-gate.js'
import { upstreamWsHeaders } from './headers.js'
import { forwardContext } from './context.js'
import { upstreamErrorStatus } from './errors.js'
import { badHandshakeAnswer, send, UPSTREAM_FAILED, upstreamRefusedAnswer } from '../http/answers.js'
import { acceptKey } from './ws-frames.js'

/** Both sides of an admitted upgrade, right after the client's 101 went out. */
export interface Opened {
  request: FastifyRequest
  client: Socket
  /** Bytes the client sent right behind its handshake. */
  clientHead: Buffer
  app: Socket
  /** Bytes the app sent right behind its 101. */
  appHead: Buffer
  slot: Slot
  startedAt: number
}

export const UPGRADE_CONSTRAINT = {
  name: 'upgrade',
  storage () {
    const handlers = new Map<string, unknown>()
    return {
      get: (v: string) => handlers.get(v) ?? null,
      set: (v: string, store: unknown) => { handlers.set(v, store) }
    }
  },
  // Only a real handshake (Node's req.upgrade: `Connection: Upgrade` too);
  // `Upgrade: websocket` alone on a keep-alive GET is an HTTP request.
  deriveConstraint (req: IncomingMessage): string | undefined {
    return isWebSocketHandshake(req) ? 'websocket' : undefined
  },
  mustMatchWhenDerived: true
}

/** A Sec-WebSocket-Key is 16 random bytes in base64 (RFC 6455 §4.1). */
const WS_KEY_RE = /^[+/0-9A-Za-z]{22}==$/

/**
 * What `ws` would refuse in the handshake, checked before a connection slot is
 * taken or the app is contacted: a description of the problem, or undefined.
 */
function handshakeProblem (request: FastifyRequest): string | undefined {
  const h = request.headers
  if (h['sec-websocket-version'] !== '13') return 'Sec-WebSocket-Version must be 13'
  const key = h['sec-websocket-key']
  if (typeof key !== 'string' || !WS_KEY_RE.test(key.trim())) return 'Invalid Sec-WebSocket-Key'
  if (!protocolsValid(h['sec-websocket-protocol'])) return 'Invalid or duplicated Sec-WebSocket-Protocol'
  return undefined
}

export interface UpgradeDeps {
  config: Config
  metrics: Metrics
  guard: Pick<WsGuard<GuardedSession>, 'caller'>
  limits: WsLimits
  /** Takes an upgrade over once both handshakes are done. */
  opened (o: Opened): void
}

/** The app's side of the handshake: its socket, or the status the client gets (0: the client left first). */
type Dialed = { socket: Socket, head: Buffer, protocol: string } | number

export class Upgrades {
  /** Bytes that came behind a client's handshake (Node hands them to the 'upgrade' event only). */
  private readonly heads = new WeakMap<IncomingMessage, Buffer>()
  private readonly base: URL

  constructor (private readonly deps: UpgradeDeps) {
    this.base = new URL(deps.config.upstream.url)
  }

  /** The server's 'upgrade' listener: keeps what came behind the handshake for the relay. */
  readonly onUpgrade = (req: IncomingMessage, _socket: unknown, head: Buffer): void => {
    if (head.length > 0) this.heads.set(req, head)
  }

  /** The route's preHandler: admit the upgrade, connect the app, answer 101, or answer with a status. */
  readonly preHandler = async (request: FastifyRequest, reply: FastifyReply): Promise<FastifyReply | undefined> => {
    // WebSockets always need a verified caller (limits are per user), on public paths too.
    const identity = this.deps.guard.caller(request, reply)
    if (identity === null) return reply
    const problem = handshakeProblem(request)
    if (problem !== undefined) return send(reply, badHandshakeAnswer(problem))
    const slot = await this.deps.limits.admit(request, reply, identity)
    if (slot === undefined) return reply
    try {
      return await this.open(request, reply, slot)
    } catch (err) {
      // Whatever failed before the session existed, the slot goes back.
      slot.release()
      throw err
    }
  }

  /**
   * Opens the app side for an admitted upgrade, then answers the client's
   * handshake (101) and hands both sockets over; on any refusal the slot is
   * released here and the client gets a status.
   */
  private async open (request: FastifyRequest, reply: FastifyReply, slot: Slot): Promise<FastifyReply | undefined> {
    const startedAt = performance.now()
    const offered = request.headers['sec-websocket-protocol']
    const dialed = await this.dial(request, appProtocols(offered))
    if (typeof dialed === 'number') {
      slot.release()
      if (dialed === 0) return reply.hijack() // client left; nothing to answer
      return this.failed(request, reply, dialed)
    }
    const client = request.raw.socket
    if (client.destroyed) {
      dialed.socket.destroy()
      slot.release()
      return reply.hijack()
    }
    reply.hijack()
    reply.raw.detachSocket(client)
    const token = protocolToken(offered)
    const protocol = dialed.protocol !== '' ? dialed.protocol : token !== undefined && token !== null ? BEARER_PROTOCOL : ''
    client.write(switchingProtocols(request.headers['sec-websocket-key'] as string, protocol))
    const clientHead = this.heads.get(request.raw) ?? EMPTY
    this.heads.delete(request.raw)
    this.deps.opened({ request, client, clientHead, app: dialed.socket, appHead: dialed.head, slot, startedAt })
    return reply
  }

  /** The client's answer when the app refused (4xx) or could not be reached (502/504). */
  private failed (request: FastifyRequest, reply: FastifyReply, status: number): FastifyReply {
    if (status >= 500) {
      const kind = status === 504 ? 'timeout' : 'connect'
      this.deps.metrics.upstreamErrors.labels(kind, 'ws').inc()
      request.log.warn({ upstreamError: kind }, 'upstream websocket failed')
      const answer = upstreamErrorStatus(kind)
      return send(reply, UPSTREAM_FAILED[answer])
    }
    return send(reply, upstreamRefusedAnswer(status))
  }

  /**
   * The app-side handshake: an HTTP/1.1 upgrade to the app with the
   * forwarded headers, its 101 checked as the `ws` client checks it (accept
   * key, no extension, a subprotocol only from those offered and one when
   * any was). UPSTREAM_CONNECT_TIMEOUT bounds the whole handshake.
   */
  private dial (request: FastifyRequest, protocols: string[]): Promise<Dialed> {
    const { config } = this.deps
    const key = randomBytes(16).toString('base64')
    const path = stripQueryToken(request.url)
    const headers: Record<string, string> = {
      ...upstreamWsHeaders(request.headers, forwardContext(request, config)),
      connection: 'Upgrade',
      upgrade: 'websocket',
      'sec-websocket-version': '13',
      'sec-websocket-key': key
    }
    if (protocols.length > 0) headers['sec-websocket-protocol'] = protocols.join(',')
    const base = this.base
    const req = (base.protocol === 'https:' ? https : http).request({
      host: base.hostname.replace(/^\[|\]$/g, ''),
      port: base.port,
      path: base.pathname.replace(/\/+$/, '') + path,
      headers,
      agent: false
    })
    return new Promise<Dialed>((resolve) => {
      const client = request.raw.socket
      const timer = setTimeout(() => { req.destroy(new Error('handshake timed out')) }, config.upstream.connectTimeoutMs)
      const done = (d: Dialed): void => {
        clearTimeout(timer)
        client.removeListener('close', onClientGone)
        resolve(d)
      }
      const onClientGone = (): void => { req.destroy(); done(0) }
      client.once('close', onClientGone)
      req.once('upgrade', (res: IncomingMessage, socket: Socket, head: Buffer) => {
        const problem = upgradeProblem(res, key, protocols)
        if (problem === undefined) { done({ socket, head, protocol: res.headers['sec-websocket-protocol'] ?? '' }); return }
        request.log.warn({ upstreamError: 'handshake', problem }, 'upstream websocket handshake invalid')
        socket.destroy()
        done(502)
      })
      req.once('response', (res: IncomingMessage) => {
        res.resume()
        const s = res.statusCode ?? 502
        done(s >= 400 && s < 500 ? s : 502)
        req.destroy()
      })
      req.on('error', (err: Error) => { done(/timed out/.test(err.message) ? 504 : 502) })
      req.end()
    })
  }
}

/** What the `ws` client refuses in a server's 101. */
function upgradeProblem (res: IncomingMessage, key: string, offered: string[]): string | undefined {
  const h = res.headers
  if (h.upgrade?.toLowerCase() !== 'websocket') return 'Invalid Upgrade header'
  if (h['sec-websocket-accept'] !== acceptKey(key)) return 'Invalid Sec-WebSocket-Accept header'
  const chosen = h['sec-websocket-protocol']
  if (chosen !== undefined && !offered.includes(chosen)) return 'Server sent an invalid subprotocol'
  if (chosen === undefined && offered.length > 0) return 'Server sent no subprotocol'
  if (h['sec-websocket-extensions'] !== undefined) return 'Server sent a Sec-WebSocket-Extensions header but no extension was requested'
  return undefined
}

const EMPTY = Buffer.alloc(0)

/** The 101 of the client's handshake (what `ws` writes, RFC 6455 §4.2.2). */
function switchingProtocols (key: string, protocol: string): string {
  return 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
    `Sec-WebSocket-Accept: ${acceptKey(key.trim())}\r\n` +
    (protocol !== '' ? `Sec-WebSocket-Protocol: ${protocol}\r\n` : '') + '\r\n'
}
