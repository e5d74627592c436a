// The app stand-in: what the gateway fronts in production (a small Express
// JSON app), reduced to node:http so that its own cost is small and constant.
//   GET /api/resonance/*  -> 200, ~200-byte JSON (JSON.stringify per request, as res.json does)
//   anything else         -> 404 JSON
//   WebSocket (any path)  -> echo, for WebSocket runs
// Prints {"port":N} on stdout once listening (BENCH_PORT, default ephemeral).
import http from 'node:http'
import { WebSocketServer } from 'ws'

const PREFIX = '/api/resonance/'
const HOST = '127.0.0.1'
let seq = 0

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url.startsWith(PREFIX)) {
    const body = JSON.stringify({
      ok: true,
      path: req.url,
      seq: ++seq,
      at: Date.now(),
      // The identity the gateway injected (null when called directly or through the plain proxy).
      user: req.headers['x-user-sub'] ?? null,
      resonance: { frequency: 432.1, amplitude: 0.75, phase: 1.5708, damping: 0.02, harmonics: [1, 2, 3, 5, 8, 13] }
    })
    res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) })
    res.end(body)
    return
  }
  req.resume()
  const body = '{"error":"not_found"}'
  res.writeHead(404, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) })
  res.end(body)
})

const wss = new WebSocketServer({ server })
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }))
  ws.on('error', () => ws.terminate())
})

server.listen(Number(process.env.BENCH_PORT ?? 0), HOST, () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n')
})
