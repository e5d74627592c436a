/**
 * Leaf parsers shared by YAML values and environment strings. Each returns a
 * value or an error message phrased as "must be ..."; the loader prefixes the
 * field's YAML path and env name.
 */
import { isIP } from 'node:net'
import { parseDuration } from './duration.js'

export type Parsed<T> = { ok: true, value: T } | { ok: false, error: string }
export type Parser<T> = (raw: unknown) => Parsed<T>

const ok = <T>(value: T): Parsed<T> => ({ ok: true, value })
const fail = <T>(error: string): Parsed<T> => ({ ok: false, error })

export const str: Parser<string> = (raw) =>
  typeof raw === 'string' && raw.length > 0 ? ok(raw) : fail('must be a non-empty string')

export function int (min: number, max = Number.MAX_SAFE_INTEGER): Parser<number> {
  return (raw) => {
    const n = typeof raw === 'string' && /^-?\d+$/.test(raw.trim()) ? Number(raw) : raw
    return typeof n === 'number' && Number.isInteger(n) && n >= min && n <= max
      ? ok(n)
      : fail(`must be an integer between ${min} and ${max}`)
  }
}

export const port = int(0, 65_535)

export const bool: Parser<boolean> = (raw) => {
  if (typeof raw === 'boolean') return ok(raw)
  if (typeof raw === 'string') {
    const s = raw.trim().toLowerCase()
    if (['true', '1', 'yes', 'on'].includes(s)) return ok(true)
    if (['false', '0', 'no', 'off'].includes(s)) return ok(false)
  }
  return fail('must be a boolean (true/false)')
}

/** Node timers clamp longer delays to 1 ms: a "30d" timeout would fire at once. */
export const MAX_DURATION_MS = 2_147_483_647

/** A parser of durations is tagged, so the reference table can say its default is in ms. */
export interface DurationParser extends Parser<number> { readonly unit: 'ms' }

export function duration (minMs = 0): DurationParser {
  const parse: Parser<number> = (raw) => {
    const ms = parseDuration(raw)
    return ms !== undefined && ms >= minMs && ms <= MAX_DURATION_MS
      ? ok(ms)
      : fail(`must be a duration in ms or with a unit (e.g. 500ms, 60s, 1m)${minMs > 0 ? `, at least ${minMs} ms` : ''}, at most 24d`)
  }
  return Object.assign(parse, { unit: 'ms' as const })
}

/** Seconds as a plain number (JWT_CLOCK_TOLERANCE), also accepting "5s". */
export const seconds: Parser<number> = (raw) => {
  if (typeof raw === 'number' || (typeof raw === 'string' && /^\d+(\.\d+)?$/.test(raw.trim()))) {
    const n = Number(raw)
    return Number.isFinite(n) && n >= 0 && n <= 3600 ? ok(n) : fail('must be between 0 and 3600 seconds')
  }
  const ms = parseDuration(raw)
  return ms !== undefined && ms <= 3_600_000 ? ok(ms / 1000) : fail('must be a number of seconds (0..3600)')
}

export function oneOf<T extends string> (values: readonly T[]): Parser<T> {
  return (raw) => typeof raw === 'string' && (values as readonly string[]).includes(raw)
    ? ok(raw as T)
    : fail(`must be one of ${values.join(', ')}`)
}

/** A list: YAML sequence or comma-separated env string; every item checked. */
export function list<T> (item: Parser<T>, { nonEmpty = false } = {}): Parser<T[]> {
  return (raw) => {
    const items = typeof raw === 'string'
      ? raw.split(',').map((s) => s.trim()).filter((s) => s.length > 0)
      : raw
    if (!Array.isArray(items)) return fail('must be a list (YAML sequence or comma-separated string)')
    if (nonEmpty && items.length === 0) return fail('must not be empty')
    const out: T[] = []
    for (const [i, v] of items.entries()) {
      const r = item(v)
      if (!r.ok) return fail(`item ${i} (${JSON.stringify(v)}) ${r.error}`)
      out.push(r.value)
    }
    return ok(out)
  }
}

/** A shared secret: long enough not to be guessed, no whitespace. */
export const secretToken: Parser<string> = (raw) =>
  typeof raw === 'string' && /^\S{16,}$/.test(raw) ? ok(raw) : fail('must be at least 16 characters without spaces')

/** `host:port`, or a redis:// URL naming one node. */
export const hostPort: Parser<string> = (raw) => {
  if (typeof raw !== 'string') return fail('must be host:port')
  const m = /^(?:rediss?:\/\/(?:[^@/]*@)?)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})\/?$/.exec(raw.trim())
  return m !== null && Number(m[2]) > 0 && Number(m[2]) <= 65_535 ? ok(raw.trim()) : fail('must be host:port')
}

/** An absolute request path for a route of the gateway's own: `/` and path characters, no query or fragment. */
export const urlPath: Parser<string> = (raw) =>
  typeof raw === 'string' && /^\/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$/.test(raw) && !raw.includes('//')
    ? ok(raw)
    : fail('must be a path such as /backchannel-logout (no query, no fragment, no //)')

export function url (protocols: readonly string[]): Parser<string> {
  return (raw) => {
    if (typeof raw !== 'string' || raw.length === 0) return fail('must be a URL')
    let u: URL
    try {
      u = new URL(raw)
    } catch {
      return fail(`must be a URL (${protocols.join(' or ')})`)
    }
    if (!protocols.includes(u.protocol.slice(0, -1))) return fail(`must use ${protocols.join(' or ')}`)
    if (u.hash !== '') return fail('must not contain a #fragment')
    return ok(raw)
  }
}

/**
 * TRUST_PROXY: false | true (trust every hop: only behind a proxy you control) |
 * a hop count | a comma list of IPs/CIDRs. Passed to Fastify's trustProxy.
 */
export type TrustProxy = boolean | number | string[]
export const trustProxy: Parser<TrustProxy> = (raw) => {
  // A number is a hop count ("1" must not become `true`, which trusts every hop).
  const n = int(1, 100)(raw)
  if (n.ok) return n
  const b = typeof raw === 'boolean' || (typeof raw === 'string' && /^(true|false|yes|no|on|off|0)$/i.test(raw.trim())) ? bool(raw) : undefined
  if (b?.ok === true) return b
  const l = list<string>((v) => {
    if (typeof v !== 'string') return fail('must be an IP or CIDR')
    const [addr, bits, extra] = v.split('/')
    const family = isIP(addr ?? '')
    const maxBits = family === 6 ? 128 : 32
    const bitsOk = bits === undefined || (/^\d+$/.test(bits) && Number(bits) <= maxBits)
    return family !== 0 && bitsOk && extra === undefined ? ok(v) : fail('must be an IP or CIDR')
  }, { nonEmpty: true })(raw)
  return l.ok ? l : fail('must be true, false, a hop count, or a comma list of IPs/CIDRs')
}

export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const
export type LogLevel = typeof LOG_LEVELS[number]

/** Asymmetric algorithms only: keys come from a JWKS. HS* and none are never allowed. */
export const JWT_ALGORITHMS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA'] as const
export type JwtAlgorithm = typeof JWT_ALGORITHMS[number]
