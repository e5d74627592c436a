// Inputs for unit tests that call src/ directly, without sockets: a verified caller as auth hands it on, the
// per-request context the header rules (src/proxy/headers.ts) are given, and a request as the audit trail reads it.
import type { FastifyRequest } from 'fastify'
import type { Identity } from '../../src/auth/identity.js'
import type { ForwardContext } from '../../src/proxy/headers.js'

/** A verified caller: a sub, a username, two roles. */
export const ALICE: Identity = {
  sub: 'f3a1-user',
  username: 'alice',
  roles: ['admin', 'app:read'],
  exp: 2_000_000_000,
  iat: 1_900_000_000,
  jti: 'j1',
  azp: 'web',
  sid: undefined
}

/** The context of one forwarded request of ALICE over HTTPS from an untrusted peer; `over` replaces fields. */
export function forwardContext (over: Partial<ForwardContext> = {}): ForwardContext {
  return {
    identity: ALICE,
    requestId: 'req-1',
    clientIp: '203.0.113.7',
    remoteAddress: '10.1.2.3',
    protocol: 'https',
    host: 'gw.example.com',
    trustProxy: false,
    forwardAuthorization: false,
    ...over
  }
}

/** What the audit trail reads of a request (id, ip, method, url): an upgrade of ALICE's from 203.0.113.7. */
export function auditedRequest (over: Partial<Pick<FastifyRequest, 'id' | 'ip' | 'method' | 'url'>> = {}): FastifyRequest {
  return { id: 'req-1', ip: '203.0.113.7', method: 'GET', url: '/ws/chat?room=1', ...over } as unknown as FastifyRequest
}
