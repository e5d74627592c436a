// Baseline: @fastify/http-proxy at '/' to the app, logger off, no auth. Every
// gateway variant is reported as a ratio against this process. The undici
// pool matches the gateway's defaults (128 connections, no pipelining), and
// `websocket: true` so the same process serves as the baseline for WebSocket runs.
// Env: UPSTREAM_URL (required); optional tuning rows (never the baseline):
//   PROXY_PIPELINING  undici pipelining depth to the app (default 1)
//   PROXY_BUFFER_BYTES  answers with a Content-Length up to this size are read
//                       whole and sent as one Buffer instead of piped (default 0: off)
//   PROXY_DISABLE_CACHE=1  reply-from's URL cache off
// With PROXY_BUFFER_BYTES=16384 PROXY_DISABLE_CACHE=1 it has the gateway's proxy tuning (row plain-proxy-tuned).
// Prints {"port":N} on stdout once listening.
import Fastify from 'fastify'
import httpProxy from '@fastify/http-proxy'

const upstream = process.env.UPSTREAM_URL
if (!upstream) {
  process.stderr.write('plain-proxy: UPSTREAM_URL is required\n')
  process.exit(1)
}
const pipelining = Number(process.env.PROXY_PIPELINING ?? 1)
const bufferBytes = Number(process.env.PROXY_BUFFER_BYTES ?? 0)
const disableCache = process.env.PROXY_DISABLE_CACHE === '1'

const replyOptions = {}
if (bufferBytes > 0) {
  replyOptions.onResponse = (request, reply, res) => {
    const len = Number(res.headers['content-length'])
    if (request.method === 'HEAD' || !(len <= bufferBytes) || typeof res.stream.bytes !== 'function') return reply.send(res.stream)
    res.stream.bytes().then((b) => reply.send(Buffer.from(b.buffer, b.byteOffset, b.byteLength)), (err) => reply.send(err))
  }
}

const app = Fastify({ logger: false })
await app.register(httpProxy, {
  upstream,
  websocket: true,
  undici: { connections: 128, pipelining },
  disableCache,
  replyOptions
})
await app.listen({ host: '127.0.0.1', port: Number(process.env.BENCH_PORT ?? 0) })
process.stdout.write(JSON.stringify({ port: app.server.address().port }) + '\n')
// A clean exit on SIGTERM, so that --cpu-prof (BENCH_PROFILE) can write its profile.
process.on('SIGTERM', () => { app.close().then(() => process.exit(0), () => process.exit(1)) })
