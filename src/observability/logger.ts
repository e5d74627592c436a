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
