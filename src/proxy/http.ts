/**
 * HTTP forwarding with @fastify/http-proxy: streams request bodies (its
 * passthrough content parsers) and large or unsized answers, sends small sized
 * answers as one buffer, strips the access_token query parameter,
 * rewrites headers both ways (proxy/headers.ts), and maps upstream failures to 502/504.
 * WebSocket upgrades never reach these routes (see proxy/ws.ts).
 */
import httpProxy from '@fastify/http-proxy'
import type { Readable } from 'node:stream'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { Metrics } from '../observability/metrics.js'
import { stripQueryToken } from '../auth/token.js'
import { rewriteDownstreamHeaders, rewriteUpstreamHeaders, type ResponseHeaders } from './headers.js'
import { forwardContext } from './context.js'
import { upstreamErrorKind, upstreamErrorStatus } from './errors.js'
import { send, UPSTREAM_FAILED } from '../http/answers.js'

export async function registerHttpProxy (app: FastifyInstance, config: Config, metrics: Metrics): Promise<void> {
  const u = config.upstream
  await app.register(httpProxy, {
    upstream: u.url,
    websocket: false,
    disableRequestLogging: true,
    // reply-from's URL cache is an LRU of 100 keyed by JSON.stringify([upstream, path]) per request: with
    // IDs in paths it mostly misses, and the key costs more than building the URL (request profile).
    disableCache: true,
    undici: {
      connections: u.connections,
      pipelining: 1,
      headersTimeout: u.timeoutMs,
      bodyTimeout: u.timeoutMs,
      connect: { timeout: u.connectTimeoutMs }
    },
    replyOptions: {
      // The raw query, minus access_token (never re-encoded otherwise).
      queryString: (_search, reqUrl) => {
        const url = stripQueryToken(reqUrl)
        const q = url.indexOf('?')
        return q === -1 ? '' : url.slice(q + 1)
      },
      // reply-from passes its own copy of the request headers: rewritten in place.
      rewriteRequestHeaders: (request, headers) => rewriteUpstreamHeaders(headers, forwardContext(request as FastifyRequest, config)),
      // The app's answer headers, before reply-from copies them onto the reply: for a client on HTTP/1.x it copies
      // them all (Connection and Keep-Alive included; its own hop-by-hop filter only runs for HTTP/2 clients).
      rewriteHeaders: (headers) => rewriteDownstreamHeaders(headers as ResponseHeaders),
      onError: (reply, { error }) => { upstreamFailed(reply as FastifyReply, error) },
      onResponse: (request, anyReply, raw) => {
        const reply = anyReply as FastifyReply
        const res = raw as unknown as UpstreamResponse
        const body = res.stream
        if (!bufferable(request.method, res.statusCode, res.headers['content-length']) || typeof body.bytes !== 'function') {
          reply.send(body)
          return
        }
        body.bytes().then(
          (b) => { reply.send(Buffer.from(b.buffer, b.byteOffset, b.byteLength)) },
          (err: unknown) => {
            // The app broke off mid-body: nothing was sent yet, so a clean 502/504 without the app's headers.
            for (const name of Object.keys(res.headers)) reply.removeHeader(name)
            upstreamFailed(reply, err)
          })
      }
    }
  })

  function upstreamFailed (reply: FastifyReply, error: unknown): void {
    const kind = upstreamErrorKind(error)
    const status = upstreamErrorStatus(kind)
    metrics.upstreamErrors.labels(kind, 'http').inc()
    reply.request.log.warn({ upstreamError: kind, code: (error as { code?: string }).code }, 'upstream request failed')
    send(reply, UPSTREAM_FAILED[status])
  }
}

/**
 * Small answers with a Content-Length are read whole and sent as one Buffer
 * (one write with the headers) instead of being piped through two streams,
 * and an answer the app breaks off mid-body becomes a clean 502 instead of a
 * truncated 200. (Its speed effect was within the bench's noise: see the
 * plain-proxy-tuned row in bench/README.md.) Anything larger, without a length
 * (chunked, SSE) or without a body keeps streaming. The bound keeps memory per
 * request at what a stream's own buffer would hold.
 */
export const BUFFER_MAX_BYTES = 16 * 1024

/** What @fastify/reply-from hands to onResponse with undici (its types name the Node response). */
interface UpstreamResponse {
  statusCode: number
  headers: Record<string, string | string[] | undefined>
  stream: Readable & { bytes?: () => Promise<Uint8Array> }
}

function bufferable (method: string, status: number, length: string | string[] | undefined): boolean {
  if (method === 'HEAD' || status === 204 || status === 304 || typeof length !== 'string') return false
  const n = Number(length)
  return n >= 0 && n <= BUFFER_MAX_BYTES
}
