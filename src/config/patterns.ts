/**
 * Path patterns for publicPaths and route rules, matched against the
 * canonical request path (src/auth/target.ts), which is also what the app
 * receives. Syntax:
 *   /exact/path      that path only
 *   /users/* /x      `*` is exactly one path segment
 *   /api/**          `**` (last segment only) is the prefix itself and anything below it
 *
 * Allow rules and deny rules match differently, so that any doubt about how
 * the app maps a path to a handler fails closed:
 *   - publicPaths (allow: no token) match the canonical path exactly: letter
 *     case and a trailing slash count (`/health/` and `/HEALTH` are not
 *     `/health`, because an app may route them elsewhere);
 *   - role rules and route limits (deny) match case-insensitively and ignore a
 *     trailing slash, as Express routes by default, so `/API/Admin/` cannot
 *     slip past a rule written for `/api/admin`.
 */
import { canonicalPath } from '../http/target.js'

/** Tests a path: the canonical path for public paths, its rulePath() for deny rules. */
export type PathMatcher = (path: string) => boolean

const SEGMENT_RE = /^[^*]*$|^\*$|^\*\*$/

export function patternError (pattern: unknown): string | undefined {
  if (typeof pattern !== 'string' || !pattern.startsWith('/')) return 'must be a path pattern starting with "/"'
  const segments = pattern.split('/').slice(1)
  for (const [i, seg] of segments.entries()) {
    if (!SEGMENT_RE.test(seg)) return 'may use "*" only as a whole segment'
    if (seg === '**' && i !== segments.length - 1) return 'may use "**" only as the last segment'
  }
  if (canonicalPath(encodePattern(pattern)) === undefined) return 'must be a valid path (no "..", "\\", "#" or encoded "/")'
  return undefined
}

/** A matcher for a deny rule (role rule, route limit): case-insensitive, trailing slash ignored. */
export function compilePattern (pattern: string): PathMatcher {
  return compile(canonicalPattern(pattern).toLowerCase(), true)
}

/** A matcher for a public path: exact case and trailing slash. */
export function compileExactPattern (pattern: string): PathMatcher {
  return compile(canonicalPattern(pattern), false)
}

/** Patterns are written as paths: brought to the canonical form requests are compared in. */
function canonicalPattern (pattern: string): string {
  return canonicalPath(encodePattern(pattern)) ?? pattern
}

/** Non-ASCII in a pattern means its UTF-8 bytes, as clients send them escaped. */
function encodePattern (pattern: string): string {
  // eslint-disable-next-line no-control-regex
  return pattern.replace(/[^\x00-\x7f]+/g, (s) => encodeURIComponent(s))
}

function compile (pattern: string, loose: boolean): PathMatcher {
  const trailing = !loose && pattern.length > 1 && pattern.endsWith('/')
  const segments = (trailing || loose ? trimTrailingSlash(pattern) : pattern).split('/').slice(1)
  let re = ''
  for (const seg of segments) {
    if (seg === '**') re += '(?:/.*)?'
    else if (seg === '*') re += '/[^/]+'
    else re += '/' + escapeRe(seg)
  }
  if (trailing) re += '/'
  const compiled = new RegExp(`^${re === '' ? '/' : re}$`)
  return (path) => compiled.test(path)
}

function trimTrailingSlash (p: string): string {
  return p.length > 1 && p.endsWith('/') ? p.slice(0, -1) : p
}

function escapeRe (s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
}

/**
 * Whether a rule listing `methods` (empty: all) applies to a request method.
 * HEAD is matched as GET: servers (Express among them) answer HEAD with the
 * GET handler, so a rule for GET must hold for HEAD too.
 */
export function ruleAppliesTo (methods: readonly string[], method: string): boolean {
  if (methods.length === 0 || methods.includes(method)) return true
  return method === 'HEAD' && methods.includes('GET')
}
