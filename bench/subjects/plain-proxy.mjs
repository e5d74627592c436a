// Baseline: @fastify/http-proxy at '/' to the app, logger off, no auth. Every
// gateway variant is reported as a ratio against this process. The undici
// pool matches the gateway's defaults (128 connections, no pipelining), and
// `websocket: true` so the same process serves as the baseline for WebSocket runs.
// Env: UPSTREAM_URL (required). Prints {"port":N} on stdout once listening.
import Fastify from 'fastify'
import httpProxy from '@fastify/http-proxy'

const upstream = process.env.UPSTREAM_URL
if (!upstream) {
  process.stderr.write('plain-proxy: UPSTREAM_URL is required\n')
  process.exit(1)
}

const app = Fastify({ logger: false })
await app.register(httpProxy, {
  upstream,
  websocket: true,
  undici: { connections: 128, pipelining: 1 }
})
await app.listen({ host: '127.0.0.1', port: Number(process.env.BENCH_PORT ?? 0) })
process.stdout.write(JSON.stringify({ port: app.server.address().port }) + '\n')
