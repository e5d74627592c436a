/**
 * The one catalogue of gateway errors. Codes are stable (operators and tests
 * match on them); messages may improve. Request-time denials are not thrown
 * errors but audited outcomes (AUTH_FAILURE_REASONS in observability/metrics.ts,
 * answers in auth/challenge.ts), so a flood of bad tokens
 * costs no stack traces.
 */
import createError from '@fastify/error'

export const ConfigInvalidError = createError('GW_CONFIG_INVALID', 'invalid configuration:\n%s')
export const JwksUnavailableError = createError('GW_JWKS_UNAVAILABLE', 'JWKS unavailable: %s', 503)
export const DiscoveryFailedError = createError('GW_DISCOVERY_FAILED', 'OIDC discovery failed: %s', 503)
// The store's policy error (src/limits/store.ts) carries GW_RATE_LIMIT_STORE_UNAVAILABLE; it is preallocated
// there because it is raised per request during an outage.
