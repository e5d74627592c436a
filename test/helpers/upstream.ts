// A real upstream standing in for the app: HTTP + WebSocket on one ephemeral loopback port. It records everything it
// receives, so tests assert what actually crossed the gateway.
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { WebSocketServer, type WebSocket } from 'ws'

export interface Recorded {
  method: string
  url: string
  headers: http.IncomingHttpHeaders
  body: Buffer
}

export interface RecordedWs {
  url: string
  headers: http.IncomingHttpHeaders
  protocol: string
  messages: Array<{ data: string, binary: boolean }>
  closed?: { code: number, reason: string }
}

export interface TestUpstream {
  url: string
  requests: Recorded[]
  wsConnections: RecordedWs[]
  reset (): void
  close (): Promise<void>
}

const BIG_CHUNK_BYTES = 64 * 1024
const CLOSE_COMMAND = /^close:(\d+):(.*)$/s

function readBody (req: http.IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = []
    req.on('data', (chunk: Buffer) => chunks.push(chunk))
    req.on('end', () => resolve(Buffer.concat(chunks)))
    req.on('error', reject)
  })
}

function nonNegativeInt (value: string | null, fallback: number): number {
  const n = Number(value)
  return value !== null && Number.isSafeInteger(n) && n >= 0 ? n : fallback
}

function streamBytes (res: http.ServerResponse, total: number): void {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': String(total) })
  let left = total
  const chunk = Buffer.alloc(BIG_CHUNK_BYTES, 'x')
  const pump = (): void => {
    while (left > 0) {
      const size = Math.min(left, BIG_CHUNK_BYTES)
      left -= size
      if (!res.write(size === BIG_CHUNK_BYTES ? chunk : chunk.subarray(0, size))) {
        res.once('drain', pump)
        return
      }
    }
    res.end()
  }
  pump()
}

/** The query value for `/respond`: raw response header lines, in order, names as written. */
export function respondHeaders (lines: Array<[string, string]>): string {
  return encodeURIComponent(JSON.stringify(lines))
}

// `/respond?headers=<respondHeaders(...)>`: 200 with exactly those raw header lines (hop-by-hop ones included, e.g.
// `Connection: keep-alive, X-Hop`), plus Content-Type and a JSON body like every other route. The body has a
// Content-Length unless a `Trailer` line is given (Node sends that only with chunked bodies).
function respond (res: http.ServerResponse, spec: string | null, payload: unknown): void {
  const lines = spec === null ? [] : JSON.parse(spec) as Array<[string, string]>
  const body = JSON.stringify(payload)
  const raw: string[] = ['Content-Type', 'application/json']
  if (!lines.some(([name]) => name.toLowerCase() === 'trailer')) raw.push('Content-Length', String(Buffer.byteLength(body)))
  for (const [name, value] of lines) raw.push(name, value)
  res.writeHead(200, raw).end(body)
}

export async function startUpstream (): Promise<TestUpstream> {
  const requests: Recorded[] = []
  const wsConnections: RecordedWs[] = []
  const timers = new Set<NodeJS.Timeout>()
  let closing: Promise<void> | undefined

  const server = http.createServer((req, res) => {
    readBody(req).then((body) => {
      const method = req.method ?? 'GET'
      const url = req.url ?? '/'
      requests.push({ method, url, headers: req.headers, body })

      const { pathname, searchParams } = new URL(url, 'http://upstream.invalid')
      const json = (status: number): void => {
        const payload = JSON.stringify({ method, url, headers: req.headers, bodyLength: body.length })
        res.writeHead(status, { 'content-type': 'application/json' }).end(payload)
      }

      const status = /^\/status\/(\d{3})$/.exec(pathname)
      if (status !== null) return json(Number(status[1]))
      if (pathname === '/slow') {
        const timer = setTimeout(() => {
          timers.delete(timer)
          json(200)
        }, nonNegativeInt(searchParams.get('ms'), 0))
        timers.add(timer)
        return
      }
      if (pathname === '/big') return streamBytes(res, nonNegativeInt(searchParams.get('bytes'), 0))
      if (pathname === '/echo') {
        const headers: http.OutgoingHttpHeaders = { 'content-length': String(body.length) }
        if (req.headers['content-type'] !== undefined) headers['content-type'] = req.headers['content-type']
        res.writeHead(200, headers).end(body)
        return
      }
      if (pathname === '/respond') return respond(res, searchParams.get('headers'), { method, url, headers: req.headers, bodyLength: body.length })
      if (pathname === '/redirect') {
        res.writeHead(302, { location: '/somewhere' }).end()
        return
      }
      json(200)
    }).catch((err: unknown) => {
      res.destroy(err instanceof Error ? err : undefined)
    })
  })

  const wss = new WebSocketServer({
    server,
    // negotiate the FIRST offered subprotocol, if any
    handleProtocols: (protocols) => {
      const [first] = protocols
      return first ?? false
    }
  })
  wss.on('connection', (socket: WebSocket, req: http.IncomingMessage) => {
    const record: RecordedWs = { url: req.url ?? '/', headers: req.headers, protocol: socket.protocol, messages: [] }
    wsConnections.push(record)
    socket.on('message', (raw, isBinary) => {
      const data = Array.isArray(raw) ? Buffer.concat(raw) : Buffer.isBuffer(raw) ? raw : Buffer.from(raw)
      const text = data.toString('utf8')
      record.messages.push({ data: text, binary: isBinary })
      const command = isBinary ? null : CLOSE_COMMAND.exec(text)
      if (command !== null) {
        socket.close(Number(command[1]), command[2])
        return
      }
      socket.send(data, { binary: isBinary })
    })
    // for a close the client started, these are the client's code/reason; for one we started, the client's echo of ours
    socket.on('close', (code, reason) => {
      record.closed = { code, reason: reason.toString('utf8') }
    })
    socket.on('error', () => {})
  })

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject)
      resolve()
    })
  })
  const { port } = server.address() as AddressInfo

  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    wsConnections,
    reset (): void {
      requests.length = 0
      wsConnections.length = 0
    },
    close (): Promise<void> {
      closing ??= (async () => {
        for (const timer of timers) clearTimeout(timer)
        timers.clear()
        for (const client of wss.clients) client.terminate()
        await new Promise<void>((resolve) => wss.close(() => resolve()))
        const closed = new Promise<void>((resolve) => server.close(() => resolve()))
        server.closeAllConnections()
        await closed
      })()
      return closing
    }
  }
}
