/**
 * The verified caller, built from access-token claims once per request.
 * Keycloak puts realm roles in realm_access.roles and client roles in
 * resource_access.<client>.roles; client roles are named `<client>:<role>`
 * (as oauth2-proxy does) so a client role never impersonates a realm role.
 */
import type { Config } from '../config/load.js'

export interface Identity {
  sub: string
  username: string | undefined
  roles: string[]
  /** Seconds since epoch. */
  exp: number
  iat: number | undefined
  jti: string | undefined
  azp: string | undefined
  /** The login session (Keycloak's user-session id): back-channel logout revokes by it. */
  sid: string | undefined
}

export type Claims = Record<string, unknown>

export type ClaimProblem = 'wrong_issuer' | 'wrong_audience' | 'missing_claim' | 'wrong_token_type'

/** Access-token `typ` values we accept (Keycloak: "Bearer"; RFC 9068: header "at+jwt"). */
const ACCESS_TYP = new Set(['bearer', 'at+jwt', 'application/at+jwt'])
const HEADER_TYP = new Set(['jwt', 'at+jwt', 'application/at+jwt'])

/**
 * Checks the claims fast-jwt does not (issuer, audience/azp, sub, exp present,
 * token type) and builds the identity. fast-jwt has already checked the
 * signature, alg, exp and nbf.
 */
export function checkClaims (auth: Config['auth'], header: Claims, claims: Claims): Identity | ClaimProblem {
  if (claims.iss !== auth.issuer) return 'wrong_issuer'
  if (!audienceOk(auth, claims)) return 'wrong_audience'
  const { sub, exp } = claims
  if (typeof sub !== 'string' || sub.length === 0 || typeof exp !== 'number') return 'missing_claim'
  if (typeof header.typ === 'string' && !HEADER_TYP.has(header.typ.toLowerCase())) return 'wrong_token_type'
  if (claims.typ !== undefined && (typeof claims.typ !== 'string' || !ACCESS_TYP.has(claims.typ.toLowerCase()))) return 'wrong_token_type'
  return {
    sub,
    username: typeof claims.preferred_username === 'string' ? claims.preferred_username : undefined,
    roles: rolesOf(claims, auth.roleClients),
    exp,
    iat: typeof claims.iat === 'number' ? claims.iat : undefined,
    jti: typeof claims.jti === 'string' ? claims.jti : undefined,
    azp: typeof claims.azp === 'string' ? claims.azp : undefined,
    sid: typeof claims.sid === 'string' && claims.sid.length > 0 ? claims.sid : undefined
  }
}

function audienceOk (auth: Config['auth'], claims: Claims): boolean {
  const aud = claims.aud
  if (typeof aud === 'string' && auth.audiences.includes(aud)) return true
  if (Array.isArray(aud) && aud.some((a) => typeof a === 'string' && auth.audiences.includes(a))) return true
  return auth.acceptAzpAsAudience && typeof claims.azp === 'string' && auth.audiences.includes(claims.azp)
}

export function rolesOf (claims: Claims, roleClients: readonly string[]): string[] {
  const roles: string[] = []
  const realm = (claims.realm_access as { roles?: unknown } | undefined)?.roles
  if (Array.isArray(realm)) for (const r of realm) if (typeof r === 'string') roles.push(r)
  const resource = claims.resource_access
  if (typeof resource === 'object' && resource !== null) {
    for (const client of roleClients) {
      const list = (resource as Record<string, { roles?: unknown } | undefined>)[client]?.roles
      if (Array.isArray(list)) for (const r of list) if (typeof r === 'string') roles.push(`${client}:${r}`)
    }
  }
  return roles
}
