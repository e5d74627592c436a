/**
 * The warm-up's traffic: real loopback sockets to the throwaway gateway, as a
 * client fleet sends it. HTTP over keep-alive connections (undici, the client
 * the gateway itself uses towards the app), several requests in flight; and
 * WebSocket sessions (the `ws` client) that send messages and read the echo.
 * The mix runs every step of the request path: the verify path (each
 * credential's first use) and the verified-token cache (every later use), the
 * limits, the proxy both ways, bodies, query strings, and a few refusals
 * (no token: 401, audit line, connection closed).
 */
import { Pool } from 'undici'
import WebSocket from 'ws'

export interface LoadPlan {
  /** The throwaway gateway's public URL (http: or https:). */
  url: string
  /** Authorization header values; each one's first use is verified, later uses hit the cache. */
  credentials: string[]
  /** Raw tokens for WebSocket upgrades (query and subprotocol carriers). */
  tokens: string[]
  /** performance.now() at which new work stops. */
  until: number
  httpConnections: number
  wsClients: number
  signal: AbortSignal
}

export interface LoadReport {
  requests: number
  /** Responses by status code. */
  statuses: Record<string, number>
  wsSessions: number
  wsMessages: number
  errors: number
  firstError: string | undefined
}

/** A loop gives up after this many failures in a row (a broken throwaway must not spin until the deadline). */
const MAX_CONSECUTIVE_ERRORS = 5
/** Messages per WebSocket session, each waiting for its echo. */
const WS_MESSAGES = 32
const JSON_BODY = JSON.stringify({ note: 'warm-up', items: [1, 2, 3], nested: { ok: true } })

export function emptyReport (): LoadReport {
  return { requests: 0, statuses: {}, wsSessions: 0, wsMessages: 0, errors: 0, firstError: undefined }
}

/** HTTP and WebSocket traffic side by side until `plan.until`. */
export async function drive (plan: LoadPlan, report: LoadReport): Promise<void> {
  const pool = new Pool(plan.url, {
    connections: plan.httpConnections,
    pipelining: 1,
    ...(plan.url.startsWith('https:') ? { connect: { rejectUnauthorized: false } } : {})
  })
  // An abort (the warm-up's time bound) ends every request in flight at once.
  const abort = (): void => { pool.destroy().catch(() => {}) }
  plan.signal.addEventListener('abort', abort, { once: true })
  let next = 0
  const take = (): number => next++
  try {
    await Promise.all([
      ...Array.from({ length: plan.httpConnections }, () => loop(plan, report, () => httpRequest(pool, plan, take(), report))),
      ...Array.from({ length: plan.wsClients }, () => loop(plan, report, () => wsSession(plan, take(), report)))
    ])
  } finally {
    plan.signal.removeEventListener('abort', abort)
    if (!pool.destroyed) await pool.close()
  }
}

/** Runs `step` until the time is up or it failed MAX_CONSECUTIVE_ERRORS times in a row. */
async function loop (plan: LoadPlan, report: LoadReport, step: () => Promise<void>): Promise<void> {
  let failures = 0
  while (performance.now() < plan.until && !plan.signal.aborted && failures < MAX_CONSECUTIVE_ERRORS) {
    try {
      await step()
      failures = 0
    } catch (err) {
      failures++
      report.errors++
      report.firstError ??= (err as Error).message
    }
  }
}

/** The i-th request of the mix: mostly GETs, every 4th with a query, every 8th a POST with a JSON body, every 32nd without a token. */
async function httpRequest (pool: Pool, plan: LoadPlan, i: number, report: LoadReport): Promise<void> {
  const credential = plan.credentials[i % plan.credentials.length] as string
  const headers: Record<string, string> = { accept: 'application/json', 'user-agent': 'resonance-gateway-warmup' }
  if (i % 32 !== 31) headers.authorization = credential
  const post = i % 8 === 3
  if (post) headers['content-type'] = 'application/json'
  const path = i % 4 === 1 ? `/warmup/items/${i % 97}?page=${i % 7}&sort=asc` : `/warmup/items/${i % 97}`
  const res = await pool.request({ path, method: post ? 'POST' : 'GET', headers, ...(post ? { body: JSON_BODY } : {}) })
  await res.body.text()
  report.requests++
  report.statuses[res.statusCode] = (report.statuses[res.statusCode] ?? 0) + 1
}

/** One WebSocket session: the token in the query or the subprotocol list (alternately), WS_MESSAGES round trips, a close. */
async function wsSession (plan: LoadPlan, i: number, report: LoadReport): Promise<void> {
  const token = plan.tokens[i % plan.tokens.length] as string
  const base = plan.url.replace(/^http/, 'ws') + `/warmup/socket/${i % 13}`
  const byProtocol = i % 2 === 1
  const ws = new WebSocket(byProtocol ? base : `${base}?access_token=${token}`, byProtocol ? ['bearer', token] : [], {
    perMessageDeflate: false,
    rejectUnauthorized: false
  })
  ws.on('error', () => {}) // a failure shows in the promises below; a second 'error' must not be unhandled
  try {
    await opened(ws, plan.signal)
    report.wsSessions++
    for (let m = 0; m < WS_MESSAGES && !plan.signal.aborted; m++) {
      await echo(ws, m % 4 === 0 ? Buffer.from(JSON_BODY) : `${JSON_BODY}#${m}`)
      report.wsMessages++
    }
    await closed(ws)
  } finally {
    ws.terminate()
  }
}

/** The 101, or a rejection: a refusal, an error, or the abort (which also ends the socket). */
function opened (ws: WebSocket, signal: AbortSignal): Promise<void> {
  const abort = (): void => { ws.terminate() }
  signal.addEventListener('abort', abort, { once: true })
  return new Promise<void>((resolve, reject) => {
    ws.once('open', resolve)
    ws.once('unexpected-response', (_req, res) => { reject(new Error(`WebSocket upgrade answered ${String(res.statusCode)}`)) })
    ws.once('error', reject)
    ws.once('close', () => { reject(new Error('WebSocket closed before it opened')) })
  }).finally(() => { signal.removeEventListener('abort', abort) })
}

/** Sends one message and waits for the app's echo. */
function echo (ws: WebSocket, data: string | Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const gone = (code: number): void => { reject(new Error(`WebSocket closed (${code}) before the echo`)) }
    ws.once('close', gone)
    ws.once('message', () => { ws.off('close', gone); resolve() })
    ws.send(data, { binary: typeof data !== 'string' })
  })
}

/** A close handshake, ended after 1 s by the caller's terminate() at the latest. */
function closed (ws: WebSocket): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, 1000)
    ws.once('close', () => { clearTimeout(timer); resolve() })
    ws.close(1000, 'warm-up done')
  })
}
