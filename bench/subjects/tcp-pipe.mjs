// The floor of any Node.js relay, for the WebSocket echo table: every
// accepted connection is piped byte for byte to the app and back (net
// sockets, stream.pipe both ways, Nagle off), handshake included. No HTTP,
// no WebSocket parsing, no auth, no limits: what the gateway's byte relay
// costs on top of this is what its frame reading, message limits and
// session bookkeeping cost.
// Env: UPSTREAM_URL (required). Prints {"port":N} on stdout once listening.
import net from 'node:net'

const upstream = process.env.UPSTREAM_URL
if (!upstream) {
  process.stderr.write('tcp-pipe: UPSTREAM_URL is required\n')
  process.exit(1)
}
const { hostname, port } = new URL(upstream)

const server = net.createServer({ noDelay: true }, (client) => {
  const app = net.connect({ host: hostname, port: Number(port), noDelay: true })
  client.pipe(app).pipe(client)
  const close = () => { client.destroy(); app.destroy() }
  client.on('error', close)
  app.on('error', close)
  client.on('close', close)
  app.on('close', close)
})
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n')
})
