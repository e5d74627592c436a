/**
 * WebSocket pass-through, bridged with @fastify/websocket (not the proxy
 * plugin's `websocket: true`): the gateway owns both sockets, so it can refuse
 * before the 101, count and hold messages, and close with its own codes
 * without touching private fields of `ws`.
 *
 * Flow of an upgrade (a GET routed through Fastify, so auth and limit hooks
 * have already run):
 *   route constraint `upgrade: websocket` picks these routes, never the HTTP proxy's
 *   preHandler: open the upstream WebSocket first, so the app's refusal
 *                (4xx) or absence (502/504) reaches the client as an HTTP
 *                status before any 101, and the app's subprotocol choice is
 *                what the client gets
 *   handler:    bridge messages both ways with bounded buffers, propagate closes
 */
import type { IncomingMessage } from 'node:http'
import websocket from '@fastify/websocket'
import WebSocket from 'ws'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { Metrics, WsCloseReason, WsDirection } from '../observability/metrics.js'
import { appProtocols, BEARER_PROTOCOL, protocolToken, stripQueryToken } from '../auth/token.js'
import { upstreamWsHeaders } from './headers.js'
import { forwardContext } from './context.js'
import { UPSTREAM_ERROR_BODY, upstreamErrorStatus } from './errors.js'

export const WS_MAX_PAYLOAD = 1024 * 1024
/** Bytes queued towards one peer before the other side is paused (backpressure). */
export const WS_HIGH_WATER = 1024 * 1024

/** Close codes the gateway sends. */
export const CLOSE = {
  normal: 1000,
  goingAway: 1001,
  policy: 1008,
  badGateway: 1014
} as const

interface Pending {
  target: WebSocket
  /** Subprotocol to answer in the 101, false for none. */
  protocol: string | false
  onClientGone: () => void
  startedAt: number
}

export interface WsBridge {
  /** Closes every proxied connection with 1001 (shutdown). */
  closeAll (reason: string): void
  readonly open: number
}

const UPGRADE_CONSTRAINT = {
  name: 'upgrade',
  storage () {
    const handlers = new Map<string, unknown>()
    return {
      get: (v: string) => handlers.get(v) ?? null,
      set: (v: string, store: unknown) => { handlers.set(v, store) }
    }
  },
  deriveConstraint (req: IncomingMessage): string | undefined {
    const u = req.headers.upgrade
    return u !== undefined && u.toLowerCase() === 'websocket' ? 'websocket' : undefined
  },
  mustMatchWhenDerived: true
}

/** Codes a peer may legally send in a close frame. */
function sendable (code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999)
}

export async function registerWsProxy (app: FastifyInstance, config: Config, metrics: Metrics): Promise<WsBridge> {
  const base = config.upstream.url.replace(/^http/, 'ws').replace(/\/+$/, '')
  const pending = new WeakMap<IncomingMessage, Pending>()
  const live = new Set<WebSocket>()

  app.addConstraintStrategy(UPGRADE_CONSTRAINT as Parameters<FastifyInstance['addConstraintStrategy']>[0])

  await app.register(websocket, {
    options: {
      maxPayload: WS_MAX_PAYLOAD,
      perMessageDeflate: false,
      handleProtocols: (_offered: Set<string>, req: IncomingMessage) => pending.get(req)?.protocol ?? false
    },
    errorHandler: (err: Error, socket: WebSocket, request: FastifyRequest) => {
      request.log.debug({ err: { message: err.message } }, 'websocket error')
      socket.terminate()
    },
    // Shutdown closes are sent by closeAll() with 1001; this only stops the server.
    preClose: function (this: FastifyInstance, done: () => void) {
      closeAll('gateway shutting down')
      this.websocketServer.close(() => done())
    }
  })

  async function connectUpstream (request: FastifyRequest, reply: FastifyReply): Promise<void> {
    const offered = request.headers['sec-websocket-protocol']
    const target = new WebSocket(base + stripQueryToken(request.url), appProtocols(offered), {
      headers: upstreamWsHeaders(request.headers, forwardContext(request, config)),
      handshakeTimeout: config.upstream.connectTimeoutMs,
      maxPayload: WS_MAX_PAYLOAD,
      perMessageDeflate: false,
      followRedirects: false
    })
    const outcome = await new Promise<{ status: number } | null>((resolve) => {
      const onClientGone = (): void => { target.terminate(); resolve({ status: 0 }) }
      request.raw.socket.once('close', onClientGone)
      target.once('open', () => {
        request.raw.socket.removeListener('close', onClientGone)
        resolve(null)
      })
      target.once('unexpected-response', (_req, res) => {
        res.resume()
        const s = res.statusCode ?? 502
        resolve({ status: s >= 400 && s < 500 ? s : 502 })
        target.terminate()
      })
      target.on('error', (err: Error & { code?: string }) => {
        if (target.readyState === WebSocket.OPEN) return // the bridge handles it
        const timeout = /timed out/i.test(err.message)
        resolve({ status: timeout ? 504 : 502 })
      })
    })
    if (outcome === null) {
      target.pause() // the app may speak first; hold it until the client side exists
      const useBearer = target.protocol === '' && protocolToken(offered) !== undefined && protocolToken(offered) !== null
      const onClientGone = (): void => { target.terminate() }
      request.raw.socket.once('close', onClientGone)
      pending.set(request.raw, {
        target,
        protocol: target.protocol !== '' ? target.protocol : useBearer ? BEARER_PROTOCOL : false,
        onClientGone,
        startedAt: performance.now()
      })
      return
    }
    if (outcome.status === 0) return // client left; nothing to answer
    if (outcome.status >= 500) {
      const kind = outcome.status === 504 ? 'timeout' : 'connect'
      metrics.upstreamErrors.labels(kind, 'ws').inc()
      request.log.warn({ upstreamError: kind }, 'upstream websocket failed')
      const status = upstreamErrorStatus(kind)
      return reply.code(status).type('application/json; charset=utf-8').send(UPSTREAM_ERROR_BODY[status])
    }
    return reply.code(outcome.status).type('application/json; charset=utf-8')
      .send(JSON.stringify({ error: 'upstream_refused', error_description: 'The app refused the WebSocket' }))
  }

  function bridge (client: WebSocket, request: FastifyRequest): void {
    const p = pending.get(request.raw)
    pending.delete(request.raw)
    if (p === undefined) { client.close(CLOSE.badGateway, 'no upstream'); return }
    const { target } = p
    request.raw.socket.removeListener('close', p.onClientGone)
    live.add(client)
    metrics.wsConnections.inc()
    metrics.observeRequest(101, (performance.now() - p.startedAt) / 1000)

    let ended: WsCloseReason | undefined
    const end = (reason: WsCloseReason): void => {
      if (ended !== undefined) return
      ended = reason
      live.delete(client)
      metrics.wsConnections.dec()
      metrics.wsCloses.labels(reason).inc()
    }

    forward(client, target, 'client_to_app')
    forward(target, client, 'app_to_client')

    client.on('close', (code, reason) => {
      end('client_closed')
      if (target.readyState === WebSocket.OPEN) {
        if (sendable(code)) target.close(code, reason)
        else if (code === 1005) target.close()
        else target.close(CLOSE.goingAway, 'client went away')
      } else if (target.readyState === WebSocket.CONNECTING) target.terminate()
    })
    target.on('close', (code, reason) => {
      end('upstream_closed')
      if (client.readyState === WebSocket.OPEN) {
        if (sendable(code)) client.close(code, reason)
        else if (code === 1005) client.close()
        else client.close(CLOSE.badGateway, 'upstream closed abnormally')
      }
    })
    target.on('error', (err) => {
      request.log.debug({ err: { message: err.message } }, 'upstream websocket error')
      end('upstream_error')
      metrics.upstreamErrors.labels('reset', 'ws').inc()
      if (client.readyState === WebSocket.OPEN) client.close(CLOSE.badGateway, 'upstream error')
    })
    client.on('error', () => {
      end('client_error')
      target.terminate()
    })
    target.resume()
  }

  /** src -> dst with backpressure: src pauses while dst has too much queued. */
  function forward (src: WebSocket, dst: WebSocket, direction: WsDirection): void {
    const counter = metrics.wsMessages[direction]
    const drained = (): void => {
      if (src.isPaused && dst.bufferedAmount < WS_HIGH_WATER / 2) src.resume()
    }
    src.on('message', (data, isBinary) => {
      if (dst.readyState !== WebSocket.OPEN) return
      counter.inc()
      dst.send(data as Buffer, { binary: isBinary }, drained)
      if (dst.bufferedAmount > WS_HIGH_WATER && !src.isPaused) src.pause()
    })
  }

  function closeAll (reason: string): void {
    for (const client of live) {
      client.close(CLOSE.goingAway, reason)
    }
  }

  for (const url of ['/', '/*']) {
    app.route({
      method: 'GET',
      url,
      constraints: { upgrade: 'websocket' },
      websocket: true,
      preHandler: connectUpstream,
      handler: bridge as never
    })
  }

  return {
    closeAll,
    get open () { return live.size }
  }
}
