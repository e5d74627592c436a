/**
 * Path patterns for publicPaths and route rules, matched against a normalised
 * request path (see normalizePath). Syntax:
 *   /exact/path      that path only (a trailing slash is ignored)
 *   /users/* /x      `*` is exactly one path segment
 *   /api/**          `**` (last segment only) is the prefix itself and anything below it
 * Matching is case-insensitive, as Express routes are by default, so that
 * `/API/admin` cannot slip past a rule written for `/api/admin`.
 */
export type PathMatcher = (normalizedPath: string) => boolean

const SEGMENT_RE = /^[^*]*$|^\*$|^\*\*$/

export function patternError (pattern: unknown): string | undefined {
  if (typeof pattern !== 'string' || !pattern.startsWith('/')) return 'must be a path pattern starting with "/"'
  const segments = pattern.split('/').slice(1)
  for (const [i, seg] of segments.entries()) {
    if (!SEGMENT_RE.test(seg)) return 'may use "*" only as a whole segment'
    if (seg === '**' && i !== segments.length - 1) return 'may use "**" only as the last segment'
  }
  return undefined
}

export function compilePattern (pattern: string): PathMatcher {
  const segments = trimTrailingSlash(pattern.toLowerCase()).split('/').slice(1)
  let re = ''
  for (const seg of segments) {
    if (seg === '**') re += '(?:/.*)?'
    else if (seg === '*') re += '/[^/]+'
    else re += '/' + escapeRe(seg)
  }
  const compiled = new RegExp(`^${re === '' ? '/' : re}$`)
  return (path) => compiled.test(path)
}

/**
 * Canonical form of a request target's path for rule matching: query dropped,
 * percent-decoding applied, `//` collapsed, dot segments resolved, trailing
 * slash removed, lower-cased. Returns undefined when the path is not valid
 * (bad percent-encoding, escaping above the root): such requests are refused.
 */
export function normalizePath (url: string): string | undefined {
  const q = url.indexOf('?')
  const raw = q === -1 ? url : url.slice(0, q)
  if (!raw.startsWith('/')) return undefined
  let decoded: string
  try {
    decoded = raw.includes('%') ? decodeURIComponent(raw) : raw
  } catch {
    return undefined
  }
  if (decoded.includes('\0')) return undefined
  const out: string[] = []
  for (const seg of decoded.replaceAll('\\', '/').split('/')) {
    if (seg === '' || seg === '.') continue
    if (seg === '..') {
      if (out.length === 0) return undefined
      out.pop()
      continue
    }
    out.push(seg)
  }
  return ('/' + out.join('/')).toLowerCase()
}

function trimTrailingSlash (p: string): string {
  return p.length > 1 && p.endsWith('/') ? p.slice(0, -1) : p
}

function escapeRe (s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}
