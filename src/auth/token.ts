/**
 * Where a bearer token may come from (RFC 6750), and how to remove it before
 * the request goes on. Pure functions, unit-tested.
 *   - `Authorization: Bearer <token>`: every request;
 *   - `?access_token=<token>`: WebSocket upgrades only (browsers cannot set
 *     headers on a WebSocket);
 *   - `Sec-WebSocket-Protocol: bearer, <token>[, app-protocol]`: upgrades only.
 * More than one of them at once is an invalid request (RFC 6750 §2).
 */
export type TokenSource = 'header' | 'query' | 'protocol'

export type Extracted =
  | { kind: 'none' }
  | { kind: 'token', token: string, source: TokenSource }
  | { kind: 'malformed' }
  | { kind: 'multiple' }

/** Subprotocol entry that announces the token in the next entry. */
export const BEARER_PROTOCOL = 'bearer'

const BEARER_RE = /^Bearer +([A-Za-z0-9\-._~+/]+=*) *$/i
const JWT_SHAPE_RE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*$/
/** Larger than any sane access token; bounds the work spent on garbage. */
export const MAX_TOKEN_LENGTH = 16 * 1024

export interface TokenCarrier {
  authorization?: string | undefined
  url: string
  protocolHeader?: string | undefined
  upgrade: boolean
}

export function extractToken (req: TokenCarrier): Extracted {
  const found: Array<{ token: string, source: TokenSource }> = []
  let malformed = false

  if (req.authorization !== undefined && /^bearer(\s|$)/i.test(req.authorization)) {
    const m = BEARER_RE.exec(req.authorization)
    if (m === null) malformed = true
    else found.push({ token: m[1] as string, source: 'header' })
  }
  if (req.upgrade) {
    const q = queryTokens(req.url)
    for (const token of q) found.push({ token, source: 'query' })
    const p = protocolToken(req.protocolHeader)
    if (p === null) malformed = true
    else if (p !== undefined) found.push({ token: p, source: 'protocol' })
  }

  if (found.length > 1) return { kind: 'multiple' }
  if (malformed) return { kind: 'malformed' }
  const one = found[0]
  if (one === undefined) return { kind: 'none' }
  if (one.token.length > MAX_TOKEN_LENGTH || !JWT_SHAPE_RE.test(one.token)) return { kind: 'malformed' }
  return { kind: 'token', token: one.token, source: one.source }
}

/** The non-empty access_token query values (exact name, after percent-decoding). */
export function queryTokens (url: string): string[] {
  const q = url.indexOf('?')
  if (q === -1) return []
  // URLSearchParams decodes names too: `access%5Ftoken` is the same parameter to the app.
  return new URLSearchParams(url.slice(q + 1)).getAll('access_token').filter((v) => v !== '')
}

/**
 * Whether a query parameter name is a spelling of access_token to some
 * server-side parser: any letter case, percent-encoded, with a `[...]` suffix
 * (qs, PHP, Rack arrays), `.`, space or `[` where `_` stands (PHP rewrites
 * those to `_`), or cut short by a NUL. Also catches names that merely start
 * with `access_token_`, which is the safe side.
 */
export function isTokenParamName (rawName: string): boolean {
  let name = rawName
  if (name.includes('%') || name.includes('+')) {
    try { name = decodeURIComponent(name.replaceAll('+', ' ')) } catch { return false }
  }
  if (name.length < 12) return false
  const nul = name.indexOf('\0')
  if (nul !== -1) name = name.slice(0, nul)
  const n = name.toLowerCase().trim().replace(/[ .[\]]/g, '_')
  return n === 'access_token' || n.startsWith('access_token_')
}

/**
 * Removes every access_token parameter, in any spelling (isTokenParamName),
 * from a request target. Parameters are split on `&` and also on `;` (some
 * parsers accept it as a separator); everything else is kept byte for byte.
 */
export function stripQueryToken (url: string): string {
  const q = url.indexOf('?')
  if (q === -1) return url
  const query = url.slice(q + 1)
  // Cheap pre-check: no parameter name could be a spelling without these letters.
  if (!/access|%/i.test(query)) return url
  const kept: string[] = []
  for (const part of query.split('&')) {
    const pieces = part.split(';')
    const left = pieces.filter((p) => !isTokenParamName(p.split('=', 1)[0] as string))
    if (left.length === pieces.length) kept.push(part)
    else if (left.some((p) => p !== '')) kept.push(left.join(';'))
  }
  return kept.length === 0 ? url.slice(0, q) : `${url.slice(0, q)}?${kept.join('&')}`
}

/**
 * The decoded JOSE header of a compact JWS, or undefined when it is not one:
 * a cheap look at `kid`/`alg` without verifying anything.
 */
export function tokenHeader (token: string): Record<string, unknown> | undefined {
  const dot = token.indexOf('.')
  if (dot <= 0) return undefined
  try {
    const h: unknown = JSON.parse(Buffer.from(token.slice(0, dot), 'base64url').toString('utf8'))
    return typeof h === 'object' && h !== null && !Array.isArray(h) ? h as Record<string, unknown> : undefined
  } catch {
    return undefined
  }
}

function splitProtocols (header: string): string[] {
  return header.split(',').map((s) => s.trim()).filter((s) => s.length > 0)
}

/** RFC 6455 §4.1 / RFC 7230 token characters: what a subprotocol name may contain. */
const PROTOCOL_RE = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/

/**
 * Whether a Sec-WebSocket-Protocol header can be answered: every entry a
 * token and no entry twice (RFC 6455 §4.1; `ws` refuses such a handshake
 * too, so it is answered 400 before the app or a connection slot is involved).
 */
export function protocolsValid (header: string | undefined): boolean {
  if (header === undefined) return true
  const list = header.split(',').map((s) => s.trim())
  if (list.some((p) => !PROTOCOL_RE.test(p))) return false
  return new Set(list).size === list.length
}

/**
 * Token in the subprotocol list: undefined when there is none, null when the
 * `bearer` marker is not followed by a token.
 */
export function protocolToken (header: string | undefined): string | undefined | null {
  if (header === undefined) return undefined
  const list = splitProtocols(header)
  const i = list.findIndex((p) => p.toLowerCase() === BEARER_PROTOCOL)
  if (i === -1) return undefined
  const token = list[i + 1]
  return token === undefined ? null : token
}

/** The subprotocols the app should see: the marker and the token removed. */
export function appProtocols (header: string | undefined): string[] {
  if (header === undefined) return []
  const list = splitProtocols(header)
  const i = list.findIndex((p) => p.toLowerCase() === BEARER_PROTOCOL)
  if (i !== -1) list.splice(i, 2)
  return list
}
