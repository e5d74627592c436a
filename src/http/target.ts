/**
 * The one canonical request target, computed once per request before any
 * rule is matched; the app receives exactly this string (the gateway rewrites
 * the request to it), so what was authorised is what is forwarded.
 *
 * Policy (Envoy's normalize_path + merge_slashes + reject escaped slashes):
 *   - origin-form only: the target starts with `/` (absolute-form, `*` and
 *     authority-form are refused);
 *   - refused: `#` anywhere (a fragment never belongs in a request; the
 *     proxy libraries would drop it and forward a different path), a raw
 *     `\`, `%2F`, `%5C` and `%00`, a control or non-ASCII byte, a malformed
 *     escape or one that does not decode to UTF-8, `..` above the root;
 *   - escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded,
 *     other escapes keep their byte with upper-case hex;
 *   - characters the URL parser of the proxy libraries would escape
 *     themselves (`"` `<` `>` `` ` `` `{` `}` `|` `^` `[` `]`) are escaped;
 *   - `//` is merged, `.` and `..` segments are resolved (RFC 3986 §5.2.4);
 *   - a trailing slash is kept; letter case is kept (the app decides both);
 *   - the query string is left as sent (the app parses it).
 * The result is a fixed point of the WHATWG URL parser that undici and `ws`
 * apply, so neither changes the path on its way to the app.
 */

const SLASH = 0x2f
const PERCENT = 0x25

/** Characters kept as they are in a canonical path: RFC 3986 pchar without `%`, plus `/`. */
const KEEP = new Uint8Array(128)
for (const c of 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&\'()*+,;=:@/') KEEP[c.charCodeAt(0)] = 1
/** Printable ASCII outside pchar that URL parsers escape or that RFC 3986 forbids: escaped. */
const ESCAPE = new Uint8Array(128)
for (const c of '"<>`{}|^[]') ESCAPE[c.charCodeAt(0)] = 1
/** Unreserved characters: their escapes are decoded (RFC 3986 §6.2.2.2). */
const UNRESERVED = new Uint8Array(128)
for (const c of 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~') UNRESERVED[c.charCodeAt(0)] = 1
/** Escaped bytes that are refused: `/`, `\` and NUL would change what a segment is. */
const REFUSED_ESCAPES = new Set([0x2f, 0x5c, 0x00])

const HEX = '0123456789ABCDEF'

function hexValue (c: number): number {
  if (c >= 0x30 && c <= 0x39) return c - 0x30
  const l = c | 0x20
  if (l >= 0x61 && l <= 0x66) return l - 0x61 + 10
  return -1
}

/**
 * The canonical form of a request target (path canonicalised, query kept),
 * or undefined when the gateway refuses it (answered 400 `invalid_path`).
 */
export function canonicalTarget (url: string): string | undefined {
  if (url.charCodeAt(0) !== SLASH) return undefined
  const q = url.indexOf('?')
  const end = q === -1 ? url.length : q
  // The fast path: nothing to decode, escape, merge or resolve.
  let plain = true
  for (let i = 0; i < end; i++) {
    const c = url.charCodeAt(i)
    if (c >= 128 || KEEP[c] !== 1) { plain = false; break }
    if (c === SLASH && i + 1 < end) {
      const n = url.charCodeAt(i + 1)
      if (n === SLASH || n === 0x2e) { plain = false; break } // `//` or a segment starting with `.`
    }
  }
  if (plain) return url.includes('#', end) ? undefined : url
  if (url.includes('#', end)) return undefined
  const path = canonicalPath(url.slice(0, end))
  if (path === undefined) return undefined
  return q === -1 ? path : path + url.slice(q)
}

/** Canonical form of a path (no query), or undefined when it is refused. */
export function canonicalPath (raw: string): string | undefined {
  if (raw.charCodeAt(0) !== SLASH) return undefined
  const out: string[] = []
  let escaped = false
  const segments = raw.split('/')
  const last = segments.length - 1
  let trailingSlash = false
  for (let s = 1; s <= last; s++) {
    const seg = canonicalSegment(segments[s] as string)
    if (seg === undefined) return undefined
    if (!escaped && seg.includes('%')) escaped = true
    if (seg === '' || seg === '.') {
      trailingSlash = s === last
      continue
    }
    if (seg === '..') {
      if (out.length === 0) return undefined
      out.pop()
      trailingSlash = s === last
      continue
    }
    out.push(seg)
    trailingSlash = false
  }
  const path = out.length === 0 ? '/' : '/' + out.join('/') + (trailingSlash ? '/' : '')
  if (escaped) {
    // Escapes must spell UTF-8: the app (and the proxy libraries) decode them.
    try { decodeURIComponent(path) } catch { return undefined }
  }
  return path
}

function canonicalSegment (seg: string): string | undefined {
  let out = ''
  for (let i = 0; i < seg.length; i++) {
    const c = seg.charCodeAt(i)
    if (c >= 128) return undefined
    if (KEEP[c] === 1) { out += seg[i]; continue }
    if (c === PERCENT) {
      const hi = hexValue(seg.charCodeAt(i + 1))
      const lo = hexValue(seg.charCodeAt(i + 2))
      if (hi < 0 || lo < 0) return undefined
      const byte = hi * 16 + lo
      if (REFUSED_ESCAPES.has(byte)) return undefined
      out += byte < 128 && UNRESERVED[byte] === 1 ? String.fromCharCode(byte) : '%' + HEX[hi] + HEX[lo]
      i += 2
      continue
    }
    if (ESCAPE[c] === 1) { out += '%' + HEX[c >> 4] + HEX[c & 15]; continue }
    return undefined // `\`, `#`, space, controls
  }
  return out
}

/**
 * The path as deny rules (role rules, route limits) see it: the canonical
 * path lower-cased, without a trailing slash, as Express routes by default
 * (case-insensitive, non-strict), so no spelling the app treats as the same
 * route escapes a rule.
 */
export function rulePath (canonicalUrl: string): string {
  const q = canonicalUrl.indexOf('?')
  let p = q === -1 ? canonicalUrl : canonicalUrl.slice(0, q)
  if (p.length > 1 && p.charCodeAt(p.length - 1) === SLASH) p = p.slice(0, -1)
  return p.toLowerCase()
}

/** The path part of a canonical target. */
export function targetPath (canonicalUrl: string): string {
  const q = canonicalUrl.indexOf('?')
  return q === -1 ? canonicalUrl : canonicalUrl.slice(0, q)
}
