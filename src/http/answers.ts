/**
 * Every answer the gateway writes itself, in one place: the RFC 6750
 * challenges of auth (401 with `WWW-Authenticate: Bearer`, 400
 * invalid_request, 403 insufficient_scope), the limits' 429 and 503, the
 * proxy's 502/504 and refusals, the router's 400/405/500, the admin API's
 * answers and the text message a dropped WebSocket message earns.
 *
 * Bodies are small JSON documents `{"error": ..., "error_description": ...}`
 * with fixed descriptions, never echoing client input or internals. Static
 * answers are built once at load: a denial costs no string building.
 */
import type { FastifyReply } from 'fastify'

export const JSON_TYPE = 'application/json; charset=utf-8'
export const REALM = 'resonance'
export const ADMIN_REALM = 'resonance-admin'

export interface Answer {
  status: number
  headers: Readonly<Record<string, string>>
  body: string
}

interface AnswerOptions {
  /** `Cache-Control: no-store` (RFC 6750 §3: every answer about a token). */
  noStore?: boolean
  /** The `WWW-Authenticate` value. */
  challenge?: string
}

function answer (status: number, error: string, description: string, opts: AnswerOptions = {}): Answer {
  const headers: Record<string, string> = { 'content-type': JSON_TYPE }
  if (opts.noStore === true) headers['cache-control'] = 'no-store'
  if (opts.challenge !== undefined) headers['www-authenticate'] = opts.challenge
  return { status, headers, body: JSON.stringify({ error, error_description: description }) }
}

/** Writes `a`; `retryAfter` (seconds) adds a Retry-After header. */
export function send (reply: FastifyReply, a: Answer, retryAfter?: number): FastifyReply {
  reply.code(a.status).headers(a.headers)
  if (retryAfter !== undefined) reply.header('retry-after', retryAfter)
  return reply.send(a.body)
}

// --- auth (RFC 6750) ----------------------------------------------------------

export type OAuthError = 'invalid_request' | 'invalid_token' | 'insufficient_scope'

interface Challenge { status: 400 | 401, error: OAuthError | undefined, description: string }

/**
 * One entry per auth failure reason (AUTH_FAILURE_REASONS in
 * observability/metrics.ts); auth's calls do not compile when one is missing.
 */
const CHALLENGES = {
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
} as const satisfies Record<string, Challenge>
export type ChallengeReason = keyof typeof CHALLENGES

/** The WWW-Authenticate value: a bare challenge when no token was presented (RFC 6750 §3.1). */
function bearerChallenge (error: OAuthError | undefined, description: string): string {
  return error === undefined
    ? `Bearer realm="${REALM}"`
    : `Bearer realm="${REALM}", error="${error}", error_description="${description}"`
}

/** Every 401 carries the challenge; of the 400s only multiple_tokens does (it is about the token). */
const AUTH_ANSWERS = Object.fromEntries(Object.entries(CHALLENGES).map(([reason, c]) => [reason,
  answer(c.status, (c as Challenge).error ?? 'unauthorized', c.description, {
    noStore: true,
    challenge: c.status === 401 || reason === 'multiple_tokens' ? bearerChallenge((c as Challenge).error, c.description) : undefined
  })])) as Record<ChallengeReason, Answer>

export function authAnswer (reason: ChallengeReason): Answer {
  return AUTH_ANSWERS[reason]
}

export const FORBIDDEN = answer(403, 'insufficient_scope', 'The token lacks a role this route requires',
  { noStore: true, challenge: bearerChallenge('insufficient_scope', 'The token lacks a role this route requires') })

// --- back-channel logout (OpenID Connect Back-Channel Logout 1.0, section 2.8) -----------------

/** The logout was applied: 200, no body. */
export const LOGOUT_DONE: Answer = { status: 200, headers: { 'cache-control': 'no-store' }, body: '' }

const LOGOUT_REFUSALS: Record<string, string> = {
  malformed_request: 'Send one logout_token as application/x-www-form-urlencoded',
  replayed: 'The logout token was already used',
  store_unavailable: 'The logout applies to this replica only: the revocation store is unavailable'
}
const logoutRefusals = new Map<string, Answer>()
/**
 * 400 for a refused logout (the specification's status for an invalid request
 * and for a logout that failed): invalid_request naming the kind of problem,
 * or temporarily_unavailable when the revocation store failed.
 */
export function logoutAnswer (result: string): Answer {
  let a = logoutRefusals.get(result)
  if (a === undefined) {
    const description = LOGOUT_REFUSALS[result] ?? `The logout token is invalid (${result})`
    a = answer(400, result === 'store_unavailable' ? 'temporarily_unavailable' : 'invalid_request', description, { noStore: true })
    logoutRefusals.set(result, a)
  }
  return a
}

// --- limits -----------------------------------------------------------------------
// 429s and 503s go out with a Retry-After (send's third argument).

export const TOO_MANY_REQUESTS = answer(429, 'rate_limited', 'Too many requests: retry after the time in Retry-After')
export const TOO_MANY_FAILURES = answer(429, 'rate_limited', 'Too many failed authentications from this address')
export const LIMITS_UNAVAILABLE = answer(503, 'unavailable', 'Rate limiting is temporarily unavailable')
export const CONNECTION_LIMITS_UNAVAILABLE = answer(503, 'unavailable', 'Connection limits are temporarily unavailable')

const tooManyWebSockets = new Map<number, Answer>()
/** 429 for an upgrade beyond WS_MAX_CONNECTIONS_PER_USER (one answer per configured value). */
export function tooManyWebSocketsAnswer (max: number): Answer {
  let a = tooManyWebSockets.get(max)
  if (a === undefined) {
    if (tooManyWebSockets.size >= 16) tooManyWebSockets.clear() // reloads change max rarely; stay bounded
    a = answer(429, 'rate_limited', `At most ${max} WebSocket connections per user`)
    tooManyWebSockets.set(max, a)
  }
  return a
}

/** The text message a client gets when its WebSocket message was dropped (WS_MESSAGE_LIMIT_ACTION=drop). */
export function droppedMessageNotice (retryAfterSec: number): string {
  return JSON.stringify({ error: 'rate_limited', error_description: 'message dropped: rate limit exceeded', retry_after: retryAfterSec })
}

// --- proxy --------------------------------------------------------------------------

/** The app could not be reached or broke the connection (502), or did not answer in time (504). */
export const UPSTREAM_FAILED: Readonly<Record<502 | 504, Answer>> = {
  502: answer(502, 'bad_gateway', 'The app is unavailable'),
  504: answer(504, 'gateway_timeout', 'The app did not answer in time')
}

/** The app answered a WebSocket handshake with this 4xx status. */
export function upstreamRefusedAnswer (status: number): Answer {
  return answer(status, 'upstream_refused', 'The app refused the WebSocket')
}

/** A WebSocket handshake `ws` would refuse; `problem` is one of ws-route's fixed descriptions. */
export function badHandshakeAnswer (problem: string): Answer {
  return answer(400, 'invalid_request', problem)
}

// --- router and error handler ----------------------------------------------------------

export const UNROUTABLE = answer(400, 'bad_request', 'The request could not be routed')
export const METHOD_NOT_ALLOWED = answer(405, 'method_not_allowed', 'The gateway does not forward this method')
export const INTERNAL_ERROR = answer(500, 'internal_error', 'The gateway failed to handle the request')

/** A 4xx Fastify raised (body too large, bad content type...): its code, never its message (may echo input). */
export function clientErrorAnswer (status: number, code: string | undefined): Answer {
  return answer(status, 'bad_request', code ?? 'invalid request')
}

// --- admin API ----------------------------------------------------------------------------

export const ADMIN_UNAUTHORIZED = answer(401, 'unauthorized', 'The admin token is missing or wrong',
  { challenge: `Bearer realm="${ADMIN_REALM}"` })
export const ADMIN_DISABLED = answer(404, 'not_found', 'Set ADMIN_TOKEN to enable the admin API')
/** A revocation request the API cannot read (400, or Fastify's 413/415). */
export function badRevocationAnswer (status = 400): Answer {
  return answer(status, 'bad_request', 'Send JSON {"jti": "..."}, {"sub": "..."} or {"sid": "..."}')
}
export const REVOCATIONS_UNAVAILABLE = answer(503, 'unavailable', 'The revocation store is unavailable')
