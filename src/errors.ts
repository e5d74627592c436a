/**
 * The one catalogue of gateway errors. Codes are stable (operators and tests
 * match on them); messages may improve. Request-time denials are not thrown
 * errors but audited outcomes (AUTH_FAILURE_REASONS in observability/metrics.ts,
 * answers in http/answers.ts), so a flood of bad tokens costs no stack
 * traces. The two errors raised per request (below) are preallocated for the
 * same reason.
 */
import createError from '@fastify/error'

export const ConfigInvalidError = createError('GW_CONFIG_INVALID', 'invalid configuration:\n%s')
export const JwksUnavailableError = createError('GW_JWKS_UNAVAILABLE', 'JWKS unavailable: %s', 503)
export const DiscoveryFailedError = createError('GW_DISCOVERY_FAILED', 'OIDC discovery failed: %s', 503)

/**
 * The rate-limit store refuses (Redis down under RATE_LIMIT_ON_STORE_ERROR=closed):
 * limits/store.ts raises STORE_UNAVAILABLE, the limits answer 503.
 */
export class StoreUnavailableError extends Error {
  readonly code = 'GW_RATE_LIMIT_STORE_UNAVAILABLE'
  constructor () { super('rate-limit store unavailable') }
}
export const STORE_UNAVAILABLE = new StoreUnavailableError()

/**
 * No key for a token (its alg, its kid, or the JWKS): raised into @fastify/jwt
 * from auth's key callback and read back as the failure reason.
 */
export class KeyError extends Error {
  readonly code = 'GW_TOKEN_KEY'
  constructor (readonly reason: 'alg_not_allowed' | 'unknown_kid' | 'jwks_unavailable' | 'malformed') { super(reason) }
}
export const KEY_ERRORS = {
  alg_not_allowed: new KeyError('alg_not_allowed'),
  unknown_kid: new KeyError('unknown_kid'),
  jwks_unavailable: new KeyError('jwks_unavailable'),
  malformed: new KeyError('malformed')
} as const
