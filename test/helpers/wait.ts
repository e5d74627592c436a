// Small shared test utilities: bounded polling, deadlines, metric and audit look-ups, token claims.
import { once } from 'node:events'
import { setTimeout as sleep } from 'node:timers/promises'
import type { WebSocket } from 'ws'
import type { Metrics } from '../../src/observability/metrics.js'
import type { TestGateway } from './gateway.js'

/** Polls `cond` every `everyMs` until it holds; fails after `ms` naming `what` (a function is called at that moment). */
export async function until (cond: () => boolean | Promise<boolean>, ms: number, what: string | (() => string), everyMs = 10): Promise<void> {
  const end = Date.now() + ms
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${typeof what === 'function' ? what() : what}`)
    await sleep(everyMs)
  }
}

/** `p`, or a rejection after `ms` naming `what`. */
export async function within<T> (p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`not within ${ms} ms: ${what}`)), ms) })
  try { return await Promise.race([p, deadline]) } finally { clearTimeout(timer) }
}

/** The value of one exact series (`name{labels}`) in a gateway's registry (or a unit test's Metrics); 0 when absent. */
export async function metric (source: TestGateway | Metrics, series: string): Promise<number> {
  const registry = 'gw' in source ? source.gw.metrics.registry : source.registry
  const text = await registry.metrics()
  const line = text.split('\n').find((l) => l.startsWith(`${series} `))
  return line === undefined ? 0 : Number(line.slice(series.length + 1))
}

const SAMPLE = /^(\w+)(?:\{([^}]*)\})?\s+(\S+)$/
const LABEL = /(\w+)="((?:[^"\\]|\\.)*)"/g

/**
 * The value of one series scraped over HTTP from an admin listener's /metrics (`adminUrl` of a TestGateway or of a
 * spawned gateway process). `labels` must equal the series' label set exactly (order does not matter; `{}` means a
 * series without labels); throws when no such series is exposed.
 */
export async function scrapeMetric (adminUrl: string, name: string, labels: Record<string, string> = {}): Promise<number> {
  const text = await (await fetch(`${adminUrl}/metrics`, { signal: AbortSignal.timeout(5000) })).text()
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`).sort().join(',')
  for (const line of text.split('\n')) {
    const m = SAMPLE.exec(line)
    if (m === null || m[1] !== name) continue
    const have = [...(m[2] ?? '').matchAll(LABEL)].map((l) => `${l[1]}="${l[2]}"`).sort().join(',')
    if (have === want) return Number(m[3])
  }
  throw new Error(`metric ${name}{${want}} not found at ${adminUrl}/metrics`)
}

/**
 * Pings `ws` and resolves on the pong. Frames travel in order on one connection, so every frame the peer sent before
 * it answered the ping has arrived by then.
 */
export async function pingPong (ws: WebSocket, ms = 5000): Promise<void> {
  const pong = once(ws, 'pong')
  ws.ping()
  await within(pong, ms, 'pong')
}

/** Audit lines whose fields equal every entry of `match`. */
export function audits (g: TestGateway, match: Record<string, unknown>): Array<Record<string, unknown>> {
  return g.audits().filter((a) => Object.entries(match).every(([k, v]) => a[k] === v))
}

/** The (unverified) payload of a JWT. */
export function claims (token: string): { jti: string, iat: number, exp: number, sub: string } {
  return JSON.parse(Buffer.from(token.split('.')[1] ?? '', 'base64url').toString()) as { jti: string, iat: number, exp: number, sub: string }
}
