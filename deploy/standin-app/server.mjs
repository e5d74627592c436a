// A stand-in for the FlappyJournal app (REST + WebSocket on one origin), for
// the compose stack and the demo. It shows what the gateway forwards: the
// verified identity headers. Replace it with the real app image in compose.
import { readFileSync } from 'node:fs'
import { createServer } from 'node:http'
import { WebSocketServer } from 'ws'

const port = Number(process.env.PORT ?? 3000)
// HOST: 0.0.0.0 in a container; the demo binds 127.0.0.1 (and PORT=0 for an ephemeral port).
const host = process.env.HOST ?? '0.0.0.0'
const entries = []
// The browser demo page (demo.html beside this file), served at /demo/ (npm run demo makes it a public path). DEMO_ISSUER:
// the development issuer the page signs in at (npm run demo sets it); unset, the page asks for it.
const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`)
const demoPage = readFileSync(new URL('demo.html', import.meta.url), 'utf8').replace('__ISSUER__', () => escapeHtml(process.env.DEMO_ISSUER ?? ''))

const server = createServer((req, res) => {
  const user = { sub: req.headers['x-user-sub'] ?? null, roles: req.headers['x-user-roles'] ?? null, name: req.headers['x-user-name'] ?? null }
  const send = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' })
    res.end(JSON.stringify(body))
  }
  const url = new URL(req.url ?? '/', 'http://app')
  if (url.pathname === '/api/resonance/health') return send(200, { status: 'ok' })
  if (url.pathname === '/demo' && req.method === 'GET') {
    res.writeHead(302, { location: '/demo/' })
    return res.end()
  }
  if (url.pathname === '/demo/' && req.method === 'GET') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' })
    return res.end(demoPage)
  }
  if (url.pathname === '/api/resonance/entries' && req.method === 'POST') {
    let body = ''
    req.setEncoding('utf8')
    req.on('data', (c) => { if (body.length < 65_536) body += c })
    req.on('end', () => {
      const entry = { id: entries.length + 1, by: user.sub, text: body.slice(0, 1000), at: new Date().toISOString() }
      entries.push(entry)
      if (entries.length > 1000) entries.shift()
      send(201, entry)
    })
    return
  }
  if (url.pathname === '/api/resonance/entries') return send(200, { entries: entries.slice(-20), user })
  if (url.pathname.startsWith('/api/resonance')) return send(200, { resonance: Math.random(), path: url.pathname, user })
  send(404, { error: 'not_found' })
})

const wss = new WebSocketServer({ server, path: '/ws/resonance' })
wss.on('connection', (socket, req) => {
  socket.send(JSON.stringify({ hello: req.headers['x-user-sub'] ?? 'anonymous' }))
  socket.on('message', (data, isBinary) => socket.send(data, { binary: isBinary }))
  socket.on('error', () => {})
})

server.listen(port, host, () => {
  // The bound port (differs from PORT when PORT=0): the demo reads it from this line.
  process.stdout.write(JSON.stringify({ msg: 'stand-in app listening', host, port: server.address().port }) + '\n')
})
const stop = () => {
  for (const client of wss.clients) client.terminate()
  wss.close()
  server.close(() => process.exit(0))
  server.closeAllConnections?.()
  setTimeout(() => process.exit(0), 2000).unref()
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
