/**
 * Bearer tokens must not travel in clear text. A request is secure when the
 * gateway terminated TLS itself, or when a trusted proxy (TRUST_PROXY) says the
 * client used https (Fastify derives request.protocol from X-Forwarded-Proto
 * only for trusted hops). ALLOW_INSECURE_HTTP=true lifts the rule (development).
 */
import type { FastifyRequest } from 'fastify'

export function transportAllowsToken (request: FastifyRequest, allowInsecureHttp: boolean): boolean {
  return allowInsecureHttp || request.protocol === 'https'
}
