/**
 * The connection budget of the public listener. A socket costs a file
 * descriptor whether or not its request ever authenticates, so two caps apply
 * before any request is parsed:
 *
 * - global (MAX_CONNECTIONS): Node's `server.maxConnections`, which closes
 *   every connection accepted beyond it. 0 derives it from the process's
 *   file-descriptor limit, keeping descriptors for the app-side pool, Redis,
 *   JWKS fetches and one app-side socket per WebSocket, so the gateway never
 *   hits EMFILE towards the app (every request to it would fail with 502).
 * - per client address (MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP): open
 *   connections of one TCP peer address (IPv6 by /64) that have not yet carried
 *   an authenticated request. A connection stops counting once a request on it
 *   had a verified identity, so a NAT's users share the cap only with their
 *   connections not yet authenticated, while one token-less address cannot
 *   hold more than the cap. A peer that TRUST_PROXY trusts (hop 0 of Fastify's
 *   trust function) is not capped: a load balancer opens every client's
 *   connection, all from its one address, and a reconnect storm has many of
 *   them in flight before any authenticates. Its connections still count
 *   towards the global cap.
 *
 * The address is the TCP peer, never X-Forwarded-For: the cap applies before
 * any header is read. Behind a load balancer every connection comes from it.
 */
import { readFileSync } from 'node:fs'
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Server, Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest, onRequestHookHandler, preHandlerHookHandler } from 'fastify'
import { proxyTrust, trustedPeer } from '../auth/transport.js'
import type { Config } from '../config/load.js'
import type { Metrics } from '../observability/metrics.js'
import { AuthFailureLimiter } from './auth-failures.js'

/**
 * Descriptors kept aside besides the app-side pool: stdio, the two listeners,
 * Redis (one per node), JWKS and discovery fetches, the config watch, and
 * the revocation subscriber.
 */
export const FD_RESERVE = 64
/** The automatic cap never goes below this, however small the descriptor limit. */
export const MIN_AUTO_CONNECTIONS = 32
/** Upper bound of the automatic cap (and of the setting). */
export const MAX_AUTO_CONNECTIONS = 1_000_000
/** The automatic cap where the descriptor limit cannot be read (no /proc/self/limits). */
export const FALLBACK_MAX_CONNECTIONS = 1000

/** The soft "Max open files" limit from the text of /proc/<pid>/limits; undefined when absent or unlimited. */
export function parseNofile (limits: string): number | undefined {
  const m = /^Max open files\s+(\S+)\s+(\S+)/m.exec(limits)
  if (m === null || m[1] === 'unlimited') return undefined
  const n = Number(m[1])
  return Number.isSafeInteger(n) && n > 0 ? n : undefined
}

/** This process's soft descriptor limit (Linux), which Node raises to the hard limit at start. */
export function readNofile (file = '/proc/self/limits'): number | undefined {
  try {
    return parseNofile(readFileSync(file, 'utf8'))
  } catch {
    return undefined
  }
}

/**
 * Client connections that fit in `nofile` descriptors: the app-side pool and
 * FD_RESERVE set aside, then 2 descriptors per connection, since each may
 * become a WebSocket with its own socket to the app.
 */
export function autoMaxConnections (nofile: number, upstreamConnections: number): number {
  const fit = Math.floor((nofile - upstreamConnections - FD_RESERVE) / 2)
  return Math.min(MAX_AUTO_CONNECTIONS, Math.max(MIN_AUTO_CONNECTIONS, fit))
}

export interface MaxConnections {
  max: number
  /** config: MAX_CONNECTIONS was set; auto: from the descriptor limit; fallback: the limit was unreadable. */
  source: 'config' | 'auto' | 'fallback'
  nofile: number | undefined
}

export function effectiveMaxConnections (configured: number, upstreamConnections: number, nofile: number | undefined): MaxConnections {
  if (configured > 0) return { max: configured, source: 'config', nofile }
  if (nofile === undefined) return { max: FALLBACK_MAX_CONNECTIONS, source: 'fallback', nofile }
  return { max: autoMaxConnections(nofile, upstreamConnections), source: 'auto', nofile }
}

/**
 * Open unauthenticated connections per client key. Pure bookkeeping: an entry
 * exists only while its count is above zero, so memory is bounded by the open
 * connections.
 */
export class UnauthenticatedConnections {
  private readonly open = new Map<string, number>()

  /** `max` > 0; a cap of 0 (disabled) is handled by not tracking at all. */
  constructor (readonly max: number) {}

  /** Counts a new connection of `key`; false, and nothing counted, when `key` already holds `max`. */
  tryAdd (key: string): boolean {
    const n = this.open.get(key) ?? 0
    if (n >= this.max) return false
    this.open.set(key, n + 1)
    return true
  }

  /** One connection of `key` closed or authenticated. */
  remove (key: string): void {
    const n = this.open.get(key)
    if (n === undefined) return
    if (n <= 1) this.open.delete(key)
    else this.open.set(key, n - 1)
  }

  count (key: string): number { return this.open.get(key) ?? 0 }

  /** Addresses with at least one unauthenticated connection. */
  get size (): number { return this.open.size }
}

export interface ConnectionGuardOptions {
  maxConnections: number
  /** 0: no per-address cap. */
  maxUnauthenticatedPerIp: number
  /** Peers exempt from the per-address cap (trusted proxies); none when absent. */
  exempt?: (address: string) => boolean
  metrics: Metrics
}

/**
 * Applies both caps to `server` (plain or TLS) and counts open connections for
 * resonance_connections_open. `authenticated(socket)` is called for every
 * request with a verified identity.
 */
export class ConnectionGuard {
  private openCount = 0
  private readonly unauthenticated: UnauthenticatedConnections | undefined
  /** Raw TCP socket -> its client key, while the connection counts as unauthenticated. */
  private readonly pending = new WeakMap<Socket, string>()

  constructor (server: Server, opts: ConnectionGuardOptions) {
    const { metrics, exempt } = opts
    this.unauthenticated = opts.maxUnauthenticatedPerIp > 0 ? new UnauthenticatedConnections(opts.maxUnauthenticatedPerIp) : undefined
    server.maxConnections = opts.maxConnections
    const refusedGlobal = metrics.connectionsRefused.labels('global')
    const refusedPerIp = metrics.connectionsRefused.labels('per_ip')
    // Node closes a connection over maxConnections before 'connection' and reports it here.
    server.on('drop', () => { refusedGlobal.inc() })
    // 'connection' carries the raw TCP socket on a TLS listener too, before any handshake work.
    server.on('connection', (socket: Socket) => {
      let key: string | undefined
      if (this.unauthenticated !== undefined) {
        const address = socket.remoteAddress
        if (address === undefined) { socket.destroy(); return } // already gone
        if (exempt?.(address) !== true) {
          key = AuthFailureLimiter.clientKey(address)
          if (!this.unauthenticated.tryAdd(key)) {
            refusedPerIp.inc()
            socket.destroy()
            return
          }
          this.pending.set(socket, key)
        }
      }
      this.openCount++
      socket.once('close', () => {
        this.openCount--
        this.release(socket)
      })
    })
    metrics.countOpenConnections(() => this.openCount)
  }

  /** Open client connections on the listener. */
  get open (): number { return this.openCount }

  /**
   * The connection of `socket` carried an authenticated request: it no longer
   * counts against its address. On TLS, `socket` is the TLSSocket, whose
   * `_parent` is the raw socket seen at 'connection' (Node internals, stable
   * since v0.11; the TLS test in connections.test.ts covers it).
   */
  authenticated (socket: Socket | null): void {
    if (socket === null || this.unauthenticated === undefined || this.unauthenticated.size === 0) return
    if (!this.release(socket)) this.release((socket as Socket & { _parent?: Socket })._parent)
  }

  private release (socket: Socket | undefined): boolean {
    if (socket === undefined) return false
    const key = this.pending.get(socket)
    if (key === undefined) return false
    this.pending.delete(socket)
    this.unauthenticated?.remove(key)
    return true
  }
}

/** Deadlines of the public listener, as Node's server options. */
export interface ListenerDeadlines {
  requestTimeout: number
  headersTimeout: number
  keepAliveTimeout: number
  connectionsCheckingInterval: number
}

/**
 * Node checks request and header deadlines only every
 * `connectionsCheckingInterval` (30 s by default), so a 10 s headersTimeout
 * could let a connection live 40 s: check at least twice per headersTimeout,
 * and at least every second.
 */
export function connectionsCheckingInterval (headersTimeoutMs: number): number {
  return Math.max(50, Math.min(1000, Math.floor(headersTimeoutMs / 2)))
}

/**
 * The listener's deadlines. Fastify sets requestTimeout and keepAliveTimeout
 * itself (its requestTimeout default 0 turns Node's off); headersTimeout and
 * the checking interval only exist as server options, which Fastify passes as
 * `http` (plain) or inside `https` (TLS).
 */
export function listenerDeadlines (config: Config): ListenerDeadlines {
  return {
    requestTimeout: config.server.requestTimeoutMs,
    headersTimeout: config.server.headersTimeoutMs,
    keepAliveTimeout: config.server.keepAliveTimeoutMs,
    connectionsCheckingInterval: connectionsCheckingInterval(config.server.headersTimeoutMs)
  }
}

/**
 * A response that must end its connection instead of keeping it alive:
 * - any status >= 400 while the request's declared body was not read to its
 *   end: Node would otherwise keep reading (and discarding) it, for as long as
 *   the client dribbles it;
 * - a 400 or 401 the gateway produced itself (not the app's): whoever sent it
 *   is not a client worth a kept-alive connection.
 */
export function mustClose (request: FastifyRequest, status: number, forwarded: boolean): boolean {
  if (status < 400) return false
  if (!forwarded && (status === 400 || status === 401)) return true
  const raw = request.raw
  if (raw.complete) return false
  const length = raw.headers['content-length']
  return (length !== undefined && length !== '0') || raw.headers['transfer-encoding'] !== undefined
}

/** Hooks that must run at given points of the pipeline (app.ts places them). */
export interface ConnectionHooks {
  /** onRequest, right after auth: a verified caller's connection stops counting as unauthenticated. */
  afterAuth: onRequestHookHandler
  /** preHandler, the last before the proxy: the request is forwarded; an `Expect: 100-continue` gets its 100 now. */
  beforeProxy: preHandlerHookHandler
}

/**
 * The public listener's connection policy: both caps (ConnectionGuard, logged
 * at start), `Connection: close` on denials (mustClose, in an onSend hook), and
 * Expect: 100-continue answered only once auth and limits passed.
 * TRUST_PROXY is a restart setting, so its trust function is built once here,
 * by the same proxyTrust that app.ts hands to Fastify.
 */
export function guardConnections (app: FastifyInstance, config: Config, metrics: Metrics, deadlines: ListenerDeadlines): ConnectionHooks {
  const maxConnections = effectiveMaxConnections(config.server.maxConnections, config.upstream.connections, readNofile())
  const trust = proxyTrust(config.server.trustProxy)
  const guard = new ConnectionGuard(app.server, {
    maxConnections: maxConnections.max,
    maxUnauthenticatedPerIp: config.server.maxUnauthenticatedPerIp,
    exempt: trust === false ? undefined : (address) => trustedPeer(trust, address),
    metrics
  })
  app.log.info({
    component: 'connections',
    maxConnections: maxConnections.max,
    maxConnectionsSource: maxConnections.source,
    nofile: maxConnections.nofile,
    maxUnauthenticatedPerIp: config.server.maxUnauthenticatedPerIp,
    trustedProxiesUncapped: trust !== false,
    requestTimeoutMs: deadlines.requestTimeout,
    headersTimeoutMs: deadlines.headersTimeout,
    keepAliveTimeoutMs: deadlines.keepAliveTimeout
  }, 'connection limits')
  if (config.server.maxUnauthenticatedPerIp >= maxConnections.max) {
    app.log.warn({ component: 'config' }, `server.maxUnauthenticatedPerIp (MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP, ${config.server.maxUnauthenticatedPerIp}) is not below the connection cap (${maxConnections.max}): one client address without a token can take every connection.`)
  }

  // Expect: 100-continue. Without a 'checkContinue' listener Node answers
  // 100 Continue before any hook ran, inviting the body of a request that is
  // then denied. Here the request goes through the pipeline like any other;
  // the 100 is written just before forwarding (beforeProxy), and a denial goes
  // out without it (Node then closes the connection).
  const wantsContinue = new WeakSet<IncomingMessage>()
  app.server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => {
    wantsContinue.add(req)
    app.routing(req, res)
  })

  // Requests that passed auth and limits and were handed to the proxy: their
  // 4xx are the app's (or the proxy's 502/504), not the gateway's denials.
  const forwarded = new WeakSet<FastifyRequest>()
  app.addHook('onSend', (request, reply, payload, done) => {
    if (mustClose(request, reply.statusCode, forwarded.has(request))) reply.header('connection', 'close')
    // A 403 (missing role) still verified the caller: the connection is not anonymous.
    // request.raw.socket is null once a body was read to its end; the response keeps it until finished.
    if (request.identity !== null) guard.authenticated(reply.raw.socket)
    done(null, payload)
  })

  return {
    afterAuth: (request, _reply, done) => {
      if (request.identity !== null) guard.authenticated(request.raw.socket)
      done()
    },
    beforeProxy: (request, reply, done) => {
      forwarded.add(request)
      if (wantsContinue.has(request.raw)) reply.raw.writeContinue()
      done()
    }
  }
}
