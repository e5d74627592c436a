/**
 * The warm-up's counterparts, in this process on loopback: one node:http
 * server that is both the throwaway gateway's issuer (OIDC discovery and the
 * JWKS of the key the warm-up made) and its app (200 with a small JSON body
 * for any other request, as an API answers; a WebSocket echo for upgrades).
 * Nothing here ever talks to the real app or issuer.
 */
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { WebSocketServer } from 'ws'

export const LOOPBACK = '127.0.0.1'
/** Where the stub issuer lives on the stub server, laid out as a Keycloak realm. */
const REALM_PATH = '/realms/warmup'
const DISCOVERY_PATH = `${REALM_PATH}/.well-known/openid-configuration`
const JWKS_PATH = `${REALM_PATH}/protocol/openid-connect/certs`

export interface Stub {
  /** The app's base URL (the throwaway's UPSTREAM_URL). */
  url: string
  /** The issuer (the throwaway's JWT_ISSUER): discovery answers here. */
  issuer: string
  /** The public key set the JWKS answers with from now on (before: an empty set). */
  publish (jwks: { keys: object[] }): void
  close (): Promise<void>
}

/** Starts the stub; its JWKS is empty until publish(). */
export async function startStub (): Promise<Stub> {
  const server = http.createServer()
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, LOOPBACK, () => { resolve() })
  })
  const url = `http://${LOOPBACK}:${(server.address() as AddressInfo).port}`
  const issuer = url + REALM_PATH
  const documents = new Map([
    [DISCOVERY_PATH, JSON.stringify({ issuer, jwks_uri: url + JWKS_PATH })],
    [JWKS_PATH, JSON.stringify({ keys: [] })]
  ])
  server.on('request', (req, res) => { answer(req, res, documents) })
  const wss = new WebSocketServer({ server, perMessageDeflate: false })
  wss.on('connection', (ws) => {
    ws.on('message', (data, isBinary) => { ws.send(data, { binary: isBinary }) })
    ws.on('error', () => { ws.terminate() })
  })
  return {
    url,
    issuer,
    publish: (jwks) => { documents.set(JWKS_PATH, JSON.stringify(jwks)) },
    close: async () => { await closeStub(server, wss) }
  }
}

/** The issuer's two documents by path; anything else is the app's 200 JSON (its body read first). */
function answer (req: http.IncomingMessage, res: http.ServerResponse, documents: ReadonlyMap<string, string>): void {
  const doc = req.method === 'GET' ? documents.get(req.url ?? '') : undefined
  if (doc !== undefined) {
    send(res, doc)
    return
  }
  let received = 0
  req.on('error', () => {}) // a request the gateway abandons (the warm-up's end) is no failure of the stub
  req.on('data', (chunk: Buffer) => { received += chunk.length })
  req.on('end', () => {
    send(res, JSON.stringify({ ok: true, method: req.method, path: req.url, received, user: req.headers['x-user-sub'] ?? null }))
  })
}

function send (res: http.ServerResponse, body: string): void {
  res.writeHead(200, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) })
  res.end(body)
}

async function closeStub (server: http.Server, wss: WebSocketServer): Promise<void> {
  for (const ws of wss.clients) ws.terminate()
  await new Promise<void>((resolve) => { wss.close(() => { resolve() }) })
  server.closeAllConnections()
  await new Promise<void>((resolve) => { server.close(() => { resolve() }) })
}
