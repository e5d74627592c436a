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
    const q = queryToken(req.url)
    if (q !== undefined) found.push({ token: q, source: 'query' })
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

/** The access_token query value, undefined when absent. */
export function queryToken (url: string): string | undefined {
  const q = url.indexOf('?')
  if (q === -1) return undefined
  // URLSearchParams decodes names too: `access%5Ftoken` is the same parameter to the app.
  const v = new URLSearchParams(url.slice(q + 1)).get('access_token')
  return v === null || v === '' ? undefined : v
}

/** Removes every access_token parameter from a request target. */
export function stripQueryToken (url: string): string {
  const q = url.indexOf('?')
  if (q === -1) return url
  const kept = url.slice(q + 1).split('&').filter((p) => {
    const name = p.split('=', 1)[0] as string
    let decoded = name
    try { decoded = decodeURIComponent(name.replaceAll('+', ' ')) } catch {}
    return decoded !== 'access_token'
  })
  return kept.length === 0 ? url.slice(0, q) : `${url.slice(0, q)}?${kept.join('&')}`
}

function splitProtocols (header: string): string[] {
  return header.split(',').map((s) => s.trim()).filter((s) => s.length > 0)
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
