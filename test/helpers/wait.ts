// Small shared test utilities: bounded polling, deadlines, metric and audit look-ups, token claims.
import type { TestGateway } from './gateway.js'

/** Polls `cond` until it holds; fails after `ms` naming `what`. */
export async function until (cond: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`not within ${ms} ms: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

/** `p`, or a rejection after `ms` naming `what`. */
export async function within<T> (p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const deadline = new Promise<never>((_resolve, reject) => { timer = setTimeout(() => reject(new Error(`not within ${ms} ms: ${what}`)), ms) })
  try { return await Promise.race([p, deadline]) } finally { clearTimeout(timer) }
}

/** The value of one exact series (`name{labels}`) in the gateway's registry; 0 when absent. */
export async function metric (g: TestGateway, series: string): Promise<number> {
  const text = await g.gw.metrics.registry.metrics()
  const line = text.split('\n').find((l) => l.startsWith(`${series} `))
  return line === undefined ? 0 : Number(line.slice(series.length + 1))
}

/** Audit lines whose fields equal every entry of `match`. */
export function audits (g: TestGateway, match: Record<string, unknown>): Array<Record<string, unknown>> {
  return g.audits().filter((a) => Object.entries(match).every(([k, v]) => a[k] === v))
}

/** The (unverified) payload of a JWT. */
export function claims (token: string): { jti: string, iat: number, exp: number, sub: string } {
  return JSON.parse(Buffer.from(token.split('.')[1] ?? '', 'base64url').toString()) as { jti: string, iat: number, exp: number, sub: string }
}
