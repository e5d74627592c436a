// The canonical request target (src/auth/target.ts) and how rules match it (src/config/patterns.ts): one row per
// rule of the policy README "What the app receives" states. The end-to-end table (what the app really receives,
// through sockets) is test/path-forwarding.test.ts.
import t from 'tap'
import { canonicalTarget, rulePath } from '../src/http/target.js'
import { compileExactPattern, compilePattern, ruleAppliesTo } from '../src/config/patterns.js'

t.test('canonicalTarget', async (t) => {
  const rows: Array<[string, string | undefined]> = [
    // already canonical: returned as is (the fast path)
    ['/', '/'],
    ['/a/b', '/a/b'],
    ['/a/b/', '/a/b/'],
    ['/a/b?x=1&y=%zz', '/a/b?x=1&y=%zz'],
    ['/A/Mixed/Case', '/A/Mixed/Case'],
    ["/a-b_c.d~e!$&'()*+,;=:@", "/a-b_c.d~e!$&'()*+,;=:@"],
    ['/a...b/..c/...', '/a...b/..c/...'],
    ['/.well-known/x', '/.well-known/x'],
    // query kept byte for byte (the app parses it); `?` only splits once
    ['/a?b/../../..', '/a?b/../../..'],
    ['/a//b?c//d', '/a/b?c//d'],
    // escapes of unreserved characters are decoded, others upper-cased
    ['/%61dmin', '/admin'],
    ['/api/resonance/%68ealth', '/api/resonance/health'],
    ['/%7euser/%2D%5f', '/~user/-_'],
    ['/a%20b', '/a%20b'],
    ['/caf%c3%a9', '/caf%C3%A9'],
    ['/a%3fb%23c', '/a%3Fb%23c'],
    ['/a%25', '/a%25'],
    // characters URL parsers would escape on the way are escaped here already
    ['/a"b', '/a%22b'],
    ['/a<b>', '/a%3Cb%3E'],
    ['/{x}|^`', '/%7Bx%7D%7C%5E%60'],
    ['/a[1]', '/a%5B1%5D'],
    // `//` merged
    ['//a///b//', '/a/b/'],
    ['//', '/'],
    ['/api/resonance//health', '/api/resonance/health'],
    // dot segments, plain and escaped; a trailing slash stays where the path ended in a directory
    ['/a/./b', '/a/b'],
    ['/./a', '/a'],
    ['/a/.', '/a/'],
    ['/a/b/..', '/a/'],
    ['/a/../b', '/b'],
    ['/a/b/../../c', '/c'],
    ['/a/..', '/'],
    ['/a/%2e%2e/b', '/b'],
    ['/a/%2E/b', '/a/b'],
    ['/a/.%2e/b', '/b'],
    ['/api/resonance/health/.', '/api/resonance/health/'],
    // refused: dot segments above the root
    ['/..', undefined],
    ['/../a', undefined],
    ['/a/../../b', undefined],
    ['/%2e%2e/a', undefined],
    // refused: fragments, anywhere
    ['/a#', undefined],
    ['/a#b', undefined],
    ['/a?x=1#b', undefined],
    ['/api/resonance/admin#?user=42', undefined],
    // refused: encoded separators and NUL
    ['/a%2Fb', undefined],
    ['/a%2fb', undefined],
    ['/api/resonance/health%2f', undefined],
    ['/a%5Cb', undefined],
    ['/a%5c..%5cb', undefined],
    ['/a%00b', undefined],
    // refused: raw backslash, controls, non-ASCII, space
    ['/a\\b', undefined],
    ['/a\0b', undefined],
    ['/a\tb', undefined],
    ['/café', undefined],
    ['/a b', undefined],
    // refused: bad percent-encoding, escapes that are not UTF-8
    ['/%', undefined],
    ['/%zz', undefined],
    ['/a%2', undefined],
    ['/%E0%A4%A', undefined],
    ['/%C3', undefined],
    ['/caf%E9', undefined],
    // refused: not origin-form
    ['', undefined],
    ['a/b', undefined],
    ['*', undefined],
    ['http://host/a', undefined],
    ['?x=1', undefined]
  ]
  for (const [url, expected] of rows) {
    t.equal(canonicalTarget(url), expected, `${JSON.stringify(url)} -> ${String(expected)}`)
  }
})

t.test('canonicalTarget is idempotent: the app could not canonicalise further', async (t) => {
  for (const url of ['/a//b/./c/../d/', '/%61%2e/x', '/a"b?q=1', '/caf%c3%a9/', '/x/%7E']) {
    const once = canonicalTarget(url) as string
    t.equal(canonicalTarget(once), once, url)
    // and the WHATWG URL parser (undici, ws) leaves the path alone
    t.equal(new URL(once, 'http://app').pathname, once.split('?')[0], `${url}: URL parser keeps ${once}`)
  }
})

t.test('rulePath: what deny rules see (lower case, no trailing slash)', async (t) => {
  const rows: Array<[string, string]> = [
    ['/', '/'],
    ['/API/Admin/', '/api/admin'],
    ['/a?X=1', '/a'],
    ['/caf%C3%A9', '/caf%c3%a9']
  ]
  for (const [url, expected] of rows) t.equal(rulePath(url), expected, url)
})

t.test('deny rules (compilePattern) over rulePath: case and trailing slash do not matter', async (t) => {
  const rows: Array<[string, string, boolean]> = [
    ['/healthz', '/healthz', true],
    ['/healthz', '/healthz/x', false],
    ['/healthz', '/healthzx', false],
    ['/healthz', '/', false],
    ['/', '/', true],
    ['/', '/a', false],
    ['/docs/', '/docs', true],
    ['/docs/', '/docs/x', false],
    ['/users/*', '/users/42', true],
    ['/users/*', '/users', false],
    ['/users/*', '/users/42/posts', false],
    ['/users/*/posts', '/users/42/posts', true],
    ['/users/*/posts', '/users/posts', false],
    ['/api/**', '/api', true],
    ['/api/**', '/api/x/y/z', true],
    ['/api/**', '/apix', false],
    ['/api/**', '/', false],
    ['/**', '/', true],
    ['/**', '/anything/at/all', true],
    ['/a/*/**', '/a/b', true],
    ['/a/*/**', '/a', false],
    ['/a.b', '/a.b', true],
    ['/a.b', '/axb', false],
    ['/v(1)', '/v(1)', true],
    ['/a+', '/aa', false],
    // the request side, through canonicalTarget + rulePath
    ['/api/admin', '/api/admin/', true],
    ['/api/admin', '/API/Admin', true],
    ['/api/admin', '//api//admin//', true],
    ['/api/admin', '/api/%61dmin', true],
    ['/api/**', '/API/x/', true],
    ['/users/*', '/users/42/', true],
    ['/public/**', '/public/../admin', false],
    ['/admin/**', '/public/../admin/x', true],
    ['/API/Admin', '/api/admin', true],
    ['/café', '/caf%C3%A9', true],
    ['/café', '/CAF%c3%a9', true]
  ]
  for (const [pattern, url, expected] of rows) {
    const target = canonicalTarget(url)
    t.not(target, undefined, `${url} is canonical`)
    t.equal(compilePattern(pattern)(rulePath(target as string)), expected, `${pattern} ${expected ? 'matches' : 'does not match'} ${url}`)
  }
})

t.test('public paths (compileExactPattern) over the canonical path: case and trailing slash count', async (t) => {
  const rows: Array<[string, string, boolean]> = [
    ['/api/resonance/health', '/api/resonance/health', true],
    ['/api/resonance/health', '/api/resonance/health/', false],
    ['/api/resonance/health', '/api/resonance/health/.', false],
    ['/api/resonance/health', '/API/resonance/health', false],
    ['/api/resonance/health', '/api/resonance/HEALTH', false],
    ['/api/resonance/health', '/api/resonance/%68ealth', true],
    ['/api/resonance/health', '/api/resonance//health', true],
    ['/api/resonance/health', '/api/resonance/x/../health', true],
    ['/api/resonance/health', '/api/resonance/health;x', false],
    ['/api/resonance/health', '/api/resonance/health?probe=1', true],
    ['/docs/', '/docs/', true],
    ['/docs/', '/docs', false],
    ['/static/**', '/static', true],
    ['/static/**', '/static/', true],
    ['/static/**', '/static/a/b.css', true],
    ['/static/**', '/Static/a.css', false],
    ['/static/**', '/staticx', false],
    ['/users/*', '/users/42', true],
    ['/users/*', '/users/42/', false],
    ['/café', '/caf%C3%A9', true],
    ['/café', '/caf%c3%a9', true]
  ]
  for (const [pattern, url, expected] of rows) {
    const target = canonicalTarget(url) as string
    t.not(target, undefined, `${url} is canonical`)
    const path = target.split('?')[0] as string
    t.equal(compileExactPattern(pattern)(path), expected, `${pattern} ${expected ? 'matches' : 'does not match'} ${url}`)
  }
})

t.test('ruleAppliesTo: HEAD is GET, an empty list is every method', async (t) => {
  const rows: Array<[string[], string, boolean]> = [
    [[], 'GET', true],
    [[], 'HEAD', true],
    [['GET'], 'GET', true],
    [['GET'], 'HEAD', true],
    [['GET', 'POST', 'PUT', 'DELETE'], 'HEAD', true],
    [['POST'], 'HEAD', false],
    [['HEAD'], 'GET', false],
    [['POST'], 'GET', false]
  ]
  for (const [methods, method, expected] of rows) t.equal(ruleAppliesTo(methods, method), expected, `${method} vs [${methods.join(',')}]`)
})
