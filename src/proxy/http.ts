/**
 * HTTP forwarding with @fastify/http-proxy: streams bodies both ways (its
 * passthrough content parsers), strips the access_token query parameter,
 * rewrites headers (proxy/headers.ts), and maps upstream failures to 502/504.
 * WebSocket upgrades never reach these routes (see proxy/ws.ts).
 */
import httpProxy from '@fastify/http-proxy'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Config } from '../config/load.js'
import type { Metrics } from '../observability/metrics.js'
import { stripQueryToken } from '../auth/token.js'
import { rewriteUpstreamHeaders } from './headers.js'
import { forwardContext } from './context.js'
import { UPSTREAM_ERROR_BODY, upstreamErrorKind, upstreamErrorStatus } from './errors.js'

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
      onError: (reply, { error }) => {
        const kind = upstreamErrorKind(error)
        const status = upstreamErrorStatus(kind)
        metrics.upstreamErrors.labels(kind, 'http').inc()
        reply.request.log.warn({ upstreamError: kind, code: (error as { code?: string }).code }, 'upstream request failed')
        reply.code(status).type('application/json; charset=utf-8').send(UPSTREAM_ERROR_BODY[status])
      }
    }
  })
}
