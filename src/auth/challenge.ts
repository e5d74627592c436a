/**
 * RFC 6750 answers: 401 with `WWW-Authenticate: Bearer` (error="invalid_token"
 * when a token was presented), 400 invalid_request, 403 insufficient_scope.
 * Bodies are small JSON documents; descriptions are fixed strings per reason,
 * never echoing client input or internals.
 */
import type { AuthFailureReason } from '../observability/metrics.js'

export const REALM = 'resonance'

export type OAuthError = 'invalid_request' | 'invalid_token' | 'insufficient_scope'

interface Answer { status: number, error: OAuthError | undefined, description: string }

const ANSWERS: Record<AuthFailureReason, Answer> = {
  missing_token: { status: 401, error: undefined, description: 'A bearer token is required' },
  malformed: { status: 401, error: 'invalid_token', description: 'The access token is malformed' },
  multiple_tokens: { status: 400, error: 'invalid_request', description: 'More than one access token was sent' },
  insecure_transport: { status: 401, error: 'invalid_request', description: 'Bearer tokens are only accepted over HTTPS' },
  alg_not_allowed: { status: 401, error: 'invalid_token', description: 'The token signature algorithm is not accepted' },
  unknown_kid: { status: 401, error: 'invalid_token', description: 'The token signing key is unknown' },
  jwks_unavailable: { status: 401, error: 'invalid_token', description: 'The token cannot be verified right now' },
  bad_signature: { status: 401, error: 'invalid_token', description: 'The token signature is invalid' },
  expired: { status: 401, error: 'invalid_token', description: 'The access token expired' },
  not_yet_valid: { status: 401, error: 'invalid_token', description: 'The access token is not valid yet' },
  wrong_issuer: { status: 401, error: 'invalid_token', description: 'The token issuer is not accepted' },
  wrong_audience: { status: 401, error: 'invalid_token', description: 'The token audience is not accepted' },
  missing_claim: { status: 401, error: 'invalid_token', description: 'The token lacks a required claim' },
  wrong_token_type: { status: 401, error: 'invalid_token', description: 'The token is not an access token' },
  revoked: { status: 401, error: 'invalid_token', description: 'The access token was revoked' },
  invalid_path: { status: 400, error: 'invalid_request', description: 'The request path is invalid' }
}

export interface Challenge {
  status: number
  headers: Record<string, string>
  body: string
}

function header (error: OAuthError | undefined, description: string): string {
  return error === undefined
    ? `Bearer realm="${REALM}"`
    : `Bearer realm="${REALM}", error="${error}", error_description="${description}"`
}

function build (status: number, error: OAuthError | undefined, description: string, withHeader: boolean): Challenge {
  const headers: Record<string, string> = { 'content-type': 'application/json; charset=utf-8', 'cache-control': 'no-store' }
  if (withHeader) headers['www-authenticate'] = header(error, description)
  return {
    status,
    headers,
    body: JSON.stringify({ error: error ?? 'unauthorized', error_description: description })
  }
}

/** Precomputed: a denial costs no string building. */
const CHALLENGES = Object.fromEntries(Object.entries(ANSWERS).map(([reason, a]) =>
  [reason, build(a.status, a.error, a.description, a.status === 401 || reason === 'multiple_tokens')])) as Record<AuthFailureReason, Challenge>

export function authChallenge (reason: AuthFailureReason): Challenge {
  return CHALLENGES[reason]
}

export const FORBIDDEN = build(403, 'insufficient_scope', 'The token lacks a role this route requires', true)
