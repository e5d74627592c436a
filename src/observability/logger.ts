/**
 * pino options for the gateway. Logs never carry a token: the request
 * serializer keeps the path only (the query may hold ?access_token=), headers
 * are never serialized, and the credential-bearing headers are redacted in case
 * any code path logs them anyway.
 */
import type { FastifyRequest } from 'fastify'
import type { LoggerOptions } from 'pino'
import type { LogLevel } from '../config/parsers.js'

export const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers.cookie',
  'req.headers["sec-websocket-protocol"]',
  'headers.authorization',
  'headers.cookie',
  'headers["sec-websocket-protocol"]',
  'authorization',
  'token',
  'access_token'
]

/** The request target without its query string. */
export function pathOf (url: string): string {
  const q = url.indexOf('?')
  return q === -1 ? url : url.slice(0, q)
}

export function loggerOptions (level: LogLevel): LoggerOptions {
  return {
    level,
    redact: { paths: REDACT_PATHS, censor: '[Redacted]' },
    serializers: {
      req: (req: FastifyRequest) => ({ method: req.method, path: pathOf(req.url), ip: req.ip }),
      res: (res: { statusCode: number }) => ({ statusCode: res.statusCode })
    }
  }
}

type LogFn = (...args: unknown[]) => void
interface ChildCapable {
  level: string
  child: (bindings: Record<string, unknown>, opts?: Record<string, unknown>) => ChildCapable
  fatal: LogFn,
  error: LogFn,
  warn: LogFn,
  info: LogFn,
  debug: LogFn,
  trace: LogFn,
  silent: LogFn
}

/**
 * Fastify's per-request logger (request.log, with the reqId binding), built
 * on first use instead of for every request: a pino child per request showed
 * in the request profile, and on the happy path nothing logs.
 */
export class LazyRequestLogger {
  private real: ChildCapable | undefined
  constructor (private readonly parent: ChildCapable, private readonly bindings: Record<string, unknown>, private readonly opts: Record<string, unknown>) {}
  private get log (): ChildCapable { return (this.real ??= this.parent.child(this.bindings, this.opts)) }
  get level (): string { return this.real?.level ?? (this.opts.level as string | undefined) ?? this.parent.level }
  set level (v: string) { this.log.level = v }
  child (bindings: Record<string, unknown>, opts?: Record<string, unknown>): ChildCapable { return this.log.child(bindings, opts) }
  fatal (...a: unknown[]): void { this.log.fatal(...a) }
  error (...a: unknown[]): void { this.log.error(...a) }
  warn (...a: unknown[]): void { this.log.warn(...a) }
  info (...a: unknown[]): void { this.log.info(...a) }
  debug (...a: unknown[]): void { this.log.debug(...a) }
  trace (...a: unknown[]): void { this.log.trace(...a) }
  silent (): void {}
}

/**
 * A flat copy of a string. A part cut out of a longer string (a path or a
 * token out of a request URL) is a slice that keeps the whole string alive;
 * what lives long (a cache key, a WebSocket session's audit fields) keeps a
 * copy instead.
 */
export function ownCopy (s: string): string {
  return Buffer.from(s, 'utf8').toString('utf8')
}
