// loadConfig() table tests: one row per rule. Every invalid row must fail with GW_CONFIG_INVALID and a message that
// names the YAML path and the env var of each bad field; errors are collected, not first-only (STYLE habit 4).
// Every load points CONFIG_FILE at a temp YAML so the repo's config/gateway.yaml never leaks in.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { configWarnings, loadConfig, type Config } from '../src/config/load.js'
import { configTable } from '../src/config/reference.js'
import { CONFIG_FILE, LEAVES } from '../src/config/settings.js'

const dir = mkdtempSync(join(tmpdir(), 'gw-config-test-'))
t.teardown(() => rmSync(dir, { recursive: true, force: true }))

let fileSeq = 0
function yamlFile (content: string): string {
  const file = join(dir, `gateway-${++fileSeq}.yaml`)
  writeFileSync(file, content)
  return file
}

const CERT = yamlFile('-----BEGIN CERTIFICATE-----\n')
const KEY = yamlFile('-----BEGIN PRIVATE KEY-----\n')
const MISSING = join(dir, 'does-not-exist.yaml')

/** The minimum valid environment. */
const BASE: Record<string, string> = {
  JWT_ISSUER: 'https://id.example.com/realms/demo',
  JWT_AUDIENCE: 'resonance-gateway'
}

type Env = Record<string, string | undefined>

function load (env: Env = {}, yaml = ''): Config {
  return loadConfig({ env: { ...BASE, CONFIG_FILE: yamlFile(yaml), ...env } })
}

interface ConfigError extends Error { code?: string }

function loadError (env: Env, yaml: string, file?: string): ConfigError | undefined {
  try {
    const opts = { env: { ...BASE, CONFIG_FILE: file ?? yamlFile(yaml), ...env } }
    loadConfig(opts)
  } catch (err) {
    return err as ConfigError
  }
  return undefined
}

interface BadRow {
  name: string
  env?: Env
  yaml?: string
  /** CONFIG_FILE override (default: a temp file holding `yaml`). */
  file?: string
  /** Each must appear in the message; strings are `path (ENV)` labels or fragments. */
  expect: Array<string | RegExp>
  /** Must not appear (e.g. secrets). */
  absent?: string[]
  /** Number of reported problems (`  - ` lines). */
  count: number
}

const routesYaml = (rule: string): string => `auth:\n  routes:\n${rule}`

const BAD: BadRow[] = [
  // required
  { name: 'missing JWT_ISSUER', env: { JWT_ISSUER: undefined }, expect: ['auth.issuer (JWT_ISSUER)', /required/], count: 1 },
  { name: 'missing JWT_AUDIENCE', env: { JWT_AUDIENCE: undefined }, expect: ['auth.audience (JWT_AUDIENCE)', /required/], count: 1 },
  {
    name: 'both missing: both reported',
    env: { JWT_ISSUER: undefined, JWT_AUDIENCE: undefined },
    expect: ['auth.issuer (JWT_ISSUER)', 'auth.audience (JWT_AUDIENCE)'],
    count: 2
  },
  { name: 'JWT_ISSUER empty string counts as unset', env: { JWT_ISSUER: '' }, expect: ['auth.issuer (JWT_ISSUER)', /required/], count: 1 },
  { name: 'JWT_ISSUER blank counts as unset', env: { JWT_ISSUER: '   ' }, expect: ['auth.issuer (JWT_ISSUER)', /required/], count: 1 },
  { name: 'JWT_ISSUER null in YAML', env: { JWT_ISSUER: undefined }, yaml: 'auth:\n  issuer: null\n', expect: ['auth.issuer (JWT_ISSUER)'], count: 1 },
  // ports
  { name: 'PORT=abc', env: { PORT: 'abc' }, expect: ['server.port (PORT)'], count: 1 },
  { name: 'PORT=70000', env: { PORT: '70000' }, expect: ['server.port (PORT)'], count: 1 },
  { name: 'PORT=80.5', env: { PORT: '80.5' }, expect: ['server.port (PORT)'], count: 1 },
  { name: 'ADMIN_PORT=-1', env: { ADMIN_PORT: '-1' }, expect: ['admin.port (ADMIN_PORT)'], count: 1 },
  { name: 'YAML server.port: "abc"', yaml: 'server:\n  port: abc\n', expect: ['server.port (PORT)'], absent: ['from environment'], count: 1 },
  // URLs
  { name: 'UPSTREAM_URL=ftp://x', env: { UPSTREAM_URL: 'ftp://x' }, expect: ['upstream.url (UPSTREAM_URL)'], count: 1 },
  { name: 'UPSTREAM_URL=not a url', env: { UPSTREAM_URL: 'not a url' }, expect: ['upstream.url (UPSTREAM_URL)'], count: 1 },
  { name: 'UPSTREAM_URL with a #fragment', env: { UPSTREAM_URL: 'http://app:3000/#x' }, expect: ['upstream.url (UPSTREAM_URL)'], count: 1 },
  { name: 'JWT_ISSUER=notaurl', env: { JWT_ISSUER: 'notaurl' }, expect: ['auth.issuer (JWT_ISSUER)'], count: 1 },
  { name: 'JWKS_URL=file:///etc/passwd', env: { JWKS_URL: 'file:///etc/passwd' }, expect: ['auth.jwksUrl (JWKS_URL)'], count: 1 },
  { name: 'REDIS_URL=http://x', env: { REDIS_URL: 'http://x' }, expect: ['redis.url (REDIS_URL)'], count: 1 },
  {
    name: 'REDIS_URL is secret: a bad value is not echoed',
    env: { REDIS_URL: 'http://:hunter2@redis:6379' },
    expect: ['redis.url (REDIS_URL)'],
    absent: ['hunter2'],
    count: 1
  },
  // algorithms
  { name: 'JWT_ALGORITHMS=HS256', env: { JWT_ALGORITHMS: 'HS256' }, expect: ['auth.algorithms (JWT_ALGORITHMS)'], count: 1 },
  { name: 'JWT_ALGORITHMS=none', env: { JWT_ALGORITHMS: 'none' }, expect: ['auth.algorithms (JWT_ALGORITHMS)'], count: 1 },
  { name: 'JWT_ALGORITHMS=RS256,XX', env: { JWT_ALGORITHMS: 'RS256,XX' }, expect: ['auth.algorithms (JWT_ALGORITHMS)', '"XX"'], count: 1 },
  { name: 'JWT_ALGORITHMS=rs256 (case matters)', env: { JWT_ALGORITHMS: 'rs256' }, expect: ['auth.algorithms (JWT_ALGORITHMS)'], count: 1 },
  { name: 'JWT_ALGORITHMS=","', env: { JWT_ALGORITHMS: ',' }, expect: ['auth.algorithms (JWT_ALGORITHMS)'], count: 1 },
  { name: 'YAML auth.algorithms: []', yaml: 'auth:\n  algorithms: []\n', expect: ['auth.algorithms (JWT_ALGORITHMS)'], count: 1 },
  // audience
  { name: 'JWT_AUDIENCE=" , "', env: { JWT_AUDIENCE: ' , ' }, expect: ['auth.audience (JWT_AUDIENCE)'], count: 1 },
  // durations and numbers
  { name: 'JWT_CLOCK_TOLERANCE=-1', env: { JWT_CLOCK_TOLERANCE: '-1' }, expect: ['auth.clockTolerance (JWT_CLOCK_TOLERANCE)'], count: 1 },
  { name: 'JWT_CLOCK_TOLERANCE=abc', env: { JWT_CLOCK_TOLERANCE: 'abc' }, expect: ['auth.clockTolerance (JWT_CLOCK_TOLERANCE)'], count: 1 },
  { name: 'RATE_LIMIT_MAX=0', env: { RATE_LIMIT_MAX: '0' }, expect: ['rateLimit.max (RATE_LIMIT_MAX)'], count: 1 },
  { name: 'RATE_LIMIT_MAX=1.5', env: { RATE_LIMIT_MAX: '1.5' }, expect: ['rateLimit.max (RATE_LIMIT_MAX)'], count: 1 },
  { name: 'YAML rateLimit.max: 0', yaml: 'rateLimit:\n  max: 0\n', expect: ['rateLimit.max (RATE_LIMIT_MAX)'], count: 1 },
  { name: 'RATE_LIMIT_WINDOW=abc', env: { RATE_LIMIT_WINDOW: 'abc' }, expect: ['rateLimit.window (RATE_LIMIT_WINDOW)'], count: 1 },
  { name: 'RATE_LIMIT_WINDOW=10 (below 1000 ms)', env: { RATE_LIMIT_WINDOW: '10' }, expect: ['rateLimit.window (RATE_LIMIT_WINDOW)', /1000 ms/], count: 1 },
  { name: 'RATE_LIMIT_WINDOW=999ms', env: { RATE_LIMIT_WINDOW: '999ms' }, expect: ['rateLimit.window (RATE_LIMIT_WINDOW)'], count: 1 },
  {
    // Node's timers clamp anything above 2^31-1 ms to 1 ms: a 30-day shutdown timeout would fire at once on SIGTERM.
    name: 'SHUTDOWN_TIMEOUT=30d (beyond what a timer can wait)',
    env: { SHUTDOWN_TIMEOUT: '30d' },
    expect: ['server.shutdownTimeout (SHUTDOWN_TIMEOUT)'],
    count: 1
  },
  // booleans, enums, trust
  { name: 'ALLOW_INSECURE_HTTP=maybe', env: { ALLOW_INSECURE_HTTP: 'maybe' }, expect: ['server.allowInsecureHttp (ALLOW_INSECURE_HTTP)'], count: 1 },
  { name: 'TRUST_PROXY=banana', env: { TRUST_PROXY: 'banana' }, expect: ['server.trustProxy (TRUST_PROXY)'], count: 1 },
  { name: 'TRUST_PROXY=10.0.0.0/33', env: { TRUST_PROXY: '10.0.0.0/33' }, expect: ['server.trustProxy (TRUST_PROXY)'], count: 1 },
  { name: 'TRUST_PROXY=101 (hop count above 100)', env: { TRUST_PROXY: '101' }, expect: ['server.trustProxy (TRUST_PROXY)'], count: 1 },
  { name: 'LOG_LEVEL=loud', env: { LOG_LEVEL: 'loud' }, expect: ['log.level (LOG_LEVEL)'], count: 1 },
  // TLS
  { name: 'TLS_CERT without TLS_KEY', env: { TLS_CERT: CERT }, expect: [/server\.tls\b/, 'TLS_KEY'], count: 1 },
  { name: 'TLS_KEY without TLS_CERT', env: { TLS_KEY: KEY }, expect: [/server\.tls\b/, 'TLS_CERT'], count: 1 },
  {
    name: 'TLS files that do not exist',
    env: { TLS_CERT: join(dir, 'nope.crt'), TLS_KEY: join(dir, 'nope.key') },
    expect: ['server.tls.cert (TLS_CERT)', 'server.tls.key (TLS_KEY)'],
    count: 2
  },
  // env wins, and says so
  {
    name: 'a bad env value is reported even when the YAML value is fine',
    env: { PORT: 'abc' },
    yaml: 'server:\n  port: 8081\n',
    expect: ['server.port (PORT)', /from environment/],
    count: 1
  },
  // YAML structure
  { name: 'unknown nested key server.prot', yaml: 'server:\n  prot: 1\n', expect: ['server.prot', /unknown key/], count: 1 },
  { name: 'unknown top-level key foo', yaml: 'foo: 1\n', expect: [/(^|\s)foo: unknown key/m], count: 1 },
  { name: 'unknown deep key auth.jwks.ttl', yaml: 'auth:\n  jwks:\n    ttl: 5\n', expect: ['auth.jwks.ttl', /unknown key/], count: 1 },
  { name: 'unknown key named like an Object.prototype member', yaml: 'constructor: 1\n', expect: ['constructor', /unknown key/], count: 1 },
  {
    // The key is literally "server.port": it is not server: { port }, and must not be silently ignored.
    name: 'a dotted top-level key',
    yaml: '"server.port": 1234\n',
    expect: ['server.port', /unknown key/],
    count: 1
  },
  { name: 'scalar where a mapping is expected (server: 5)', yaml: 'server: 5\n', expect: [/(^|\s)server: must be a mapping/m], count: 1 },
  { name: 'scalar where a mapping is expected (server.tls: on)', yaml: 'server:\n  tls: on\n', expect: ['server.tls', /must be a mapping/], count: 1 },
  { name: 'list at the top level', yaml: '- a\n- b\n', expect: ['(CONFIG_FILE)', /mapping/], count: 1 },
  { name: 'invalid YAML syntax', yaml: 'server:\n  port: [1, 2\n', expect: ['(CONFIG_FILE)', 'gateway-'], count: 1 },
  { name: 'duplicate YAML keys', yaml: 'server:\n  port: 1\n  port: 2\n', expect: ['(CONFIG_FILE)', /unique|duplicate/i], count: 1 },
  { name: 'CONFIG_FILE pointing to a missing file', file: MISSING, expect: ['(CONFIG_FILE)', MISSING], count: 1 },
  // publicPaths
  { name: 'publicPaths not a list', yaml: 'auth:\n  publicPaths: /healthz\n', expect: ['auth.publicPaths', /list/], count: 1 },
  { name: 'publicPaths pattern without leading slash', yaml: 'auth:\n  publicPaths: [healthz]\n', expect: ['auth.publicPaths[0]', '"healthz"'], count: 1 },
  {
    name: 'publicPaths ** not last',
    yaml: 'auth:\n  publicPaths: [/ok, "/a/**/b"]\n',
    expect: ['auth.publicPaths[1]', /"\*\*" only as the last segment/],
    count: 1
  },
  { name: 'publicPaths item not a string', yaml: 'auth:\n  publicPaths: [5]\n', expect: ['auth.publicPaths[0]'], count: 1 },
  // auth.routes
  { name: 'routes not a list', yaml: 'auth:\n  routes: { path: /a, roles: [x] }\n', expect: ['auth.routes', /list/], count: 1 },
  { name: 'route missing roles', yaml: routesYaml('    - path: /admin/**\n'), expect: ['auth.routes[0].roles'], count: 1 },
  { name: 'route with empty roles', yaml: routesYaml('    - path: /admin/**\n      roles: []\n'), expect: ['auth.routes[0].roles'], count: 1 },
  { name: 'route bad method', yaml: routesYaml('    - path: /admin/**\n      methods: [GET, FETCH]\n      roles: [admin]\n'), expect: ['auth.routes[0].methods'], count: 1 },
  { name: 'route unknown key', yaml: routesYaml('    - path: /admin/**\n      role: admin\n      roles: [admin]\n'), expect: ['auth.routes[0].role', /unknown key/], count: 1 },
  { name: 'route bad path', yaml: routesYaml('    - path: admin\n      roles: [admin]\n'), expect: ['auth.routes[0].path'], count: 1 },
  { name: 'route not a mapping', yaml: routesYaml('    - /admin\n'), expect: ['auth.routes[0]', /mapping/], count: 1 },
  {
    name: 'second route reported with its index',
    yaml: routesYaml('    - path: /a\n      roles: [x]\n    - path: /b\n'),
    expect: ['auth.routes[1].roles'],
    count: 1
  },
  // collected, not first-only
  {
    name: 'env, YAML and required problems are all reported together',
    env: { JWT_ISSUER: undefined, PORT: 'abc', RATE_LIMIT_MAX: '0' },
    yaml: 'foo: 1\nauth:\n  publicPaths: [nope]\n',
    expect: ['auth.issuer (JWT_ISSUER)', 'server.port (PORT)', 'rateLimit.max (RATE_LIMIT_MAX)', 'foo', 'auth.publicPaths[0]'],
    count: 5
  }
]

t.test('invalid configuration: GW_CONFIG_INVALID naming each field', async (t) => {
  for (const row of BAD) {
    const err = loadError(row.env ?? {}, row.yaml ?? '', row.file)
    if (err === undefined) {
      t.fail(`${row.name}: loadConfig did not throw`)
      continue
    }
    t.equal(err.code, 'GW_CONFIG_INVALID', `${row.name}: code`)
    t.match(err.message, /^invalid configuration:\n {2}- /, `${row.name}: message shape`)
    for (const e of row.expect) t.match(err.message, e, `${row.name}: names ${String(e)}`)
    for (const a of row.absent ?? []) t.notMatch(err.message, a, `${row.name}: does not contain ${a}`)
    const problems = err.message.split('\n').filter((l) => l.startsWith('  - '))
    t.equal(problems.length, row.count, `${row.name}: ${row.count} problem(s) reported\n${err.message}`)
  }
})

t.test('defaults', async (t) => {
  const file = yamlFile('')
  const c = loadConfig({ env: { ...BASE, CONFIG_FILE: file } })
  t.equal(c.source, file)
  t.equal(c.server.port, 8080)
  t.equal(c.server.host, '0.0.0.0')
  t.equal(c.admin.port, 9090)
  t.equal(c.admin.host, '127.0.0.1')
  t.equal(c.upstream.url, 'http://127.0.0.1:3000')
  t.strictSame(c.auth.algorithms, ['RS256'])
  t.equal(c.rateLimit.max, 100)
  t.equal(c.rateLimit.windowMs, 60_000)
  t.equal(c.server.allowInsecureHttp, false)
  t.equal(c.server.trustProxy, false)
  t.equal(c.server.tls, undefined)
  t.equal(c.server.shutdownDelayMs, 5_000)
  t.equal(c.server.shutdownTimeoutMs, 30_000)
  t.equal(c.upstream.forwardAuthorization, false)
  t.equal(c.auth.clockToleranceSec, 5)
  t.equal(c.auth.jwksUrl, undefined)
  t.equal(c.auth.acceptAzpAsAudience, false)
  t.strictSame(c.auth.publicPaths, [])
  t.strictSame(c.auth.routes, [])
  t.equal(c.auth.isPublic('/healthz'), false)
  t.equal(c.log.level, 'info')
  t.equal(c.redis.url, undefined)
  t.strictSame(c.auth.audiences, ['resonance-gateway'])
  t.equal(c.auth.issuer, 'https://id.example.com/realms/demo')
})

t.test('a YAML file of comments only is an empty mapping', async (t) => {
  t.equal(load({}, '# nothing here\n').server.port, 8080)
})

t.test('the `file` option overrides CONFIG_FILE', async (t) => {
  const file = yamlFile('server:\n  port: 1234\n')
  const c = loadConfig({ env: { ...BASE, CONFIG_FILE: MISSING }, file })
  t.equal(c.source, file)
  t.equal(c.server.port, 1234)
})

t.test('YAML values apply when env is unset', async (t) => {
  const c = load({}, [
    'server:',
    '  port: 1111',
    '  allowInsecureHttp: true',
    '  trustProxy: [10.0.0.0/8]',
    'auth:',
    '  algorithms: [ES256]',
    '  audience: [a, b]',
    'rateLimit:',
    '  window: 5m',
    '  max: 7',
    ''
  ].join('\n'))
  t.equal(c.server.port, 1111)
  t.equal(c.server.allowInsecureHttp, true)
  t.strictSame(c.server.trustProxy, ['10.0.0.0/8'])
  t.strictSame(c.auth.algorithms, ['ES256'])
  t.strictSame(c.auth.audiences, ['resonance-gateway'], 'JWT_AUDIENCE (in BASE) wins over YAML')
  t.equal(c.rateLimit.windowMs, 300_000)
  t.equal(c.rateLimit.max, 7)
})

t.test('env wins over YAML for every kind of leaf', async (t) => {
  const yaml = [
    'server:',
    '  host: 10.0.0.1',
    '  port: 1111',
    '  allowInsecureHttp: true',
    '  trustProxy: true',
    'upstream:',
    '  url: http://yaml-app:3000',
    'auth:',
    '  algorithms: [ES256]',
    '  clockTolerance: 30',
    'rateLimit:',
    '  window: 5m',
    '  max: 7',
    'log:',
    '  level: debug',
    ''
  ].join('\n')
  const c = load({
    HOST: '127.0.0.1',
    PORT: '2222',
    ALLOW_INSECURE_HTTP: 'false',
    TRUST_PROXY: 'false',
    UPSTREAM_URL: 'http://env-app:4000',
    JWT_ALGORITHMS: 'PS256, RS384',
    JWT_CLOCK_TOLERANCE: '2',
    RATE_LIMIT_WINDOW: '2s',
    RATE_LIMIT_MAX: '9',
    LOG_LEVEL: 'warn'
  }, yaml)
  t.equal(c.server.host, '127.0.0.1', 'string')
  t.equal(c.server.port, 2222, 'port')
  t.equal(c.server.allowInsecureHttp, false, 'bool (false beats a YAML true)')
  t.equal(c.server.trustProxy, false, 'trust proxy')
  t.equal(c.upstream.url, 'http://env-app:4000', 'url')
  t.strictSame(c.auth.algorithms, ['PS256', 'RS384'], 'list')
  t.equal(c.auth.clockToleranceSec, 2, 'seconds')
  t.equal(c.rateLimit.windowMs, 2_000, 'duration')
  t.equal(c.rateLimit.max, 9, 'int')
  t.equal(c.log.level, 'warn', 'enum')
})

t.test('empty env strings count as unset', async (t) => {
  const yaml = 'server:\n  port: 1111\n  allowInsecureHttp: true\nauth:\n  algorithms: [ES256]\nrateLimit:\n  window: 5m\n'
  for (const blank of ['', '  ']) {
    const c = load({ PORT: blank, ALLOW_INSECURE_HTTP: blank, JWT_ALGORITHMS: blank, RATE_LIMIT_WINDOW: blank, RATE_LIMIT_MAX: blank, TLS_CERT: blank, REDIS_URL: blank }, yaml)
    const label = JSON.stringify(blank)
    t.equal(c.server.port, 1111, `${label}: YAML port kept`)
    t.equal(c.server.allowInsecureHttp, true, `${label}: YAML bool kept`)
    t.strictSame(c.auth.algorithms, ['ES256'], `${label}: YAML list kept`)
    t.equal(c.rateLimit.windowMs, 300_000, `${label}: YAML duration kept`)
    t.equal(c.rateLimit.max, 100, `${label}: default kept`)
    t.equal(c.server.tls, undefined, `${label}: optional stays unset`)
    t.equal(c.redis.url, undefined, `${label}: optional stays unset`)
  }
})

t.test('RATE_LIMIT_WINDOW accepts ms and units', async (t) => {
  for (const v of ['60000', '60s', '1m', ' 60s ', '60000ms']) {
    t.equal(load({ RATE_LIMIT_WINDOW: v }).rateLimit.windowMs, 60_000, `env ${JSON.stringify(v)}`)
  }
  for (const v of ['60000', '"60000"', '60s', '1m']) {
    t.equal(load({}, `rateLimit:\n  window: ${v}\n`).rateLimit.windowMs, 60_000, `YAML ${v}`)
  }
  t.equal(load({ RATE_LIMIT_WINDOW: '1000' }).rateLimit.windowMs, 1_000, 'the 1000 ms minimum itself is allowed')
})

t.test('JWT_AUDIENCE comma list is trimmed, empty items dropped', async (t) => {
  t.strictSame(load({ JWT_AUDIENCE: ' web , api ,, mobile ' }).auth.audiences, ['web', 'api', 'mobile'])
  t.strictSame(load({ JWT_AUDIENCE: 'single' }).auth.audiences, ['single'])
})

t.test('JWT_ALGORITHMS and JWT_CLOCK_TOLERANCE forms', async (t) => {
  t.strictSame(load({ JWT_ALGORITHMS: 'RS256, ES256 ,EdDSA' }).auth.algorithms, ['RS256', 'ES256', 'EdDSA'])
  t.equal(load({ JWT_CLOCK_TOLERANCE: '0' }).auth.clockToleranceSec, 0)
  t.equal(load({ JWT_CLOCK_TOLERANCE: '1.5' }).auth.clockToleranceSec, 1.5)
  t.equal(load({ JWT_CLOCK_TOLERANCE: '30s' }).auth.clockToleranceSec, 30)
  t.equal(load({ JWT_CLOCK_TOLERANCE: '1m' }).auth.clockToleranceSec, 60)
})

t.test('TRUST_PROXY forms', async (t) => {
  const rows: Array<[string, Config['server']['trustProxy']]> = [
    ['true', true],
    ['false', false],
    ['TRUE', true],
    ['2', 2],
    ['10', 10],
    // A hop count of 1 is the common single-load-balancer setup: it must mean one hop, not `true` (trust every hop,
    // which lets any client choose its own X-Forwarded-For). YAML `trustProxy: 1` already means one hop.
    ['1', 1],
    ['10.0.0.0/8,127.0.0.1', ['10.0.0.0/8', '127.0.0.1']],
    [' 10.0.0.0/8 , ::1 ', ['10.0.0.0/8', '::1']],
    ['192.168.1.1', ['192.168.1.1']],
    ['fd00::/8', ['fd00::/8']]
  ]
  for (const [env, expected] of rows) {
    t.strictSame(load({ TRUST_PROXY: env }).server.trustProxy, expected, `TRUST_PROXY=${env}`)
  }
  t.equal(load({}, 'server:\n  trustProxy: 1\n').server.trustProxy, 1, 'YAML trustProxy: 1')
  t.equal(load({}, 'server:\n  trustProxy: true\n').server.trustProxy, true, 'YAML trustProxy: true')
  t.strictSame(load({}, 'server:\n  trustProxy: [10.0.0.1]\n').server.trustProxy, ['10.0.0.1'], 'YAML list')
})

t.test('TLS: both files set and present', async (t) => {
  t.strictSame(load({ TLS_CERT: CERT, TLS_KEY: KEY }).server.tls, { cert: CERT, key: KEY })
})

t.test('publicPaths and routes are compiled', async (t) => {
  const c = load({}, [
    'auth:',
    '  publicPaths: [/healthz, /public/**, /users/*/avatar]',
    '  routes:',
    '    - path: /admin/**',
    '      roles: [admin]',
    '    - path: /reports/*',
    '      methods: [post, DELETE]',
    '      roles: [reporter, admin]',
    ''
  ].join('\n'))
  t.strictSame(c.auth.publicPaths, ['/healthz', '/public/**', '/users/*/avatar'])
  t.equal(c.auth.isPublic('/healthz'), true)
  t.equal(c.auth.isPublic('/public'), true)
  t.equal(c.auth.isPublic('/public/a/b'), true)
  t.equal(c.auth.isPublic('/users/1/avatar'), true)
  t.equal(c.auth.isPublic('/users/1'), false)
  t.equal(c.auth.isPublic('/publicity'), false)
  t.equal(c.auth.routes.length, 2)
  const [admin, reports] = c.auth.routes
  t.strictSame(admin?.methods, [])
  t.strictSame(admin?.roles, ['admin'])
  t.equal(admin?.match('/admin/x'), true)
  t.strictSame(reports?.methods, ['POST', 'DELETE'], 'methods upper-cased')
  t.equal(reports?.match('/reports/7'), true)
})

t.test('roleClients defaults to the audiences', async (t) => {
  t.strictSame(load({ JWT_AUDIENCE: 'web,api' }).auth.roleClients, ['web', 'api'])
  t.strictSame(load({ JWT_AUDIENCE: 'web,api', JWT_ROLE_CLIENTS: 'realm-mgmt, app' }).auth.roleClients, ['realm-mgmt', 'app'])
  t.strictSame(load({ JWT_AUDIENCE: 'web', JWT_ROLE_CLIENTS: '' }).auth.roleClients, ['web'])
})

t.test('the returned config is deep-frozen', async (t) => {
  const c = load({ TRUST_PROXY: '10.0.0.0/8', TLS_CERT: CERT, TLS_KEY: KEY }, 'auth:\n  publicPaths: [/a]\n  routes:\n    - path: /b\n      methods: [GET]\n      roles: [x]\n')
  const unfrozen: string[] = []
  const walk = (v: unknown, path: string): void => {
    if (typeof v !== 'object' || v === null) return
    if (!Object.isFrozen(v)) unfrozen.push(path)
    for (const [k, child] of Object.entries(v)) walk(child, `${path}.${k}`)
  }
  walk(c, 'config')
  t.strictSame(unfrozen, [], 'every reachable object and array is frozen')
  t.ok(Object.isFrozen(c.auth.routes[0]?.roles), 'nested arrays too')
  t.throws(() => { (c.server as { port: number }).port = 1 }, TypeError, 'assignment throws (ESM is strict)')
  t.throws(() => { (c.auth.audiences as string[]).push('evil') }, TypeError, 'arrays cannot grow')
  t.throws(() => { (c.server.trustProxy as string[])[0] = '0.0.0.0/0' }, TypeError, 'trust list cannot change')
  t.equal(c.server.port, 8080)
})

t.test('loading again is not affected by a previous load (defaults are not shared mutable state)', async (t) => {
  const a = load({})
  const b = load({ JWT_ALGORITHMS: 'ES256' })
  const c = load({})
  t.strictSame(a.auth.algorithms, ['RS256'])
  t.strictSame(b.auth.algorithms, ['ES256'])
  t.strictSame(c.auth.algorithms, ['RS256'])
})

t.test('configWarnings', async (t) => {
  const AUD = /"account"/
  const PLAINTEXT = /every request that carries a token will be refused as plaintext/
  const HTTP_JWKS = /plain http from a non-loopback host/
  const SPOOF = /TRUST_PROXY=true trusts every hop: any client can send its own X-Forwarded-For and X-Forwarded-Proto/
  const HOPS = /TRUST_PROXY=2 trusts the nearest 2 hop\(s\) whoever they are/
  const UNCAPPED = /held to MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP/
  const secure = { TLS_CERT: CERT, TLS_KEY: KEY, REDIS_URL: 'redis://127.0.0.1:6379/0' }
  const rows: Array<{ name: string, env: Env, has: RegExp[], not: RegExp[] }> = [
    { name: 'audience "account"', env: { ...secure, JWT_AUDIENCE: 'account' }, has: [AUD], not: [PLAINTEXT, HTTP_JWKS] },
    { name: 'audience list containing "account"', env: { ...secure, JWT_AUDIENCE: 'gw, account' }, has: [AUD], not: [] },
    { name: 'audience "accounts" is fine', env: { ...secure, JWT_AUDIENCE: 'accounts' }, has: [], not: [AUD] },
    { name: 'no TLS, no insecure, no proxy', env: {}, has: [PLAINTEXT], not: [AUD, HTTP_JWKS] },
    { name: 'TLS set', env: secure, has: [], not: [PLAINTEXT] },
    { name: 'ALLOW_INSECURE_HTTP=true', env: { ALLOW_INSECURE_HTTP: 'true' }, has: [/ALLOW_INSECURE_HTTP=true/], not: [PLAINTEXT] },
    { name: 'TRUST_PROXY=true', env: { TRUST_PROXY: 'true' }, has: [SPOOF, UNCAPPED], not: [PLAINTEXT] },
    { name: 'TRUST_PROXY=2', env: { TRUST_PROXY: '2' }, has: [HOPS, UNCAPPED], not: [PLAINTEXT, SPOOF] },
    { name: 'TRUST_PROXY list', env: { TRUST_PROXY: '10.0.0.0/8' }, has: [], not: [PLAINTEXT, SPOOF, HOPS, UNCAPPED] },
    { name: 'http issuer on a remote host', env: { ...secure, JWT_ISSUER: 'http://keycloak.example.com/realms/r' }, has: [HTTP_JWKS], not: [] },
    { name: 'http issuer on 127.0.0.1', env: { ...secure, JWT_ISSUER: 'http://127.0.0.1:8080/realms/r' }, has: [], not: [HTTP_JWKS] },
    { name: 'http issuer on localhost', env: { ...secure, JWT_ISSUER: 'http://localhost:8080/realms/r' }, has: [], not: [HTTP_JWKS] },
    { name: 'http issuer on [::1]', env: { ...secure, JWT_ISSUER: 'http://[::1]:8080/realms/r' }, has: [], not: [HTTP_JWKS] },
    { name: 'http issuer on a host NAMED 127.<something>', env: { ...secure, JWT_ISSUER: 'http://127.attacker.example/realms/r' }, has: [HTTP_JWKS], not: [] },
    { name: 'https issuer', env: secure, has: [], not: [HTTP_JWKS] },
    { name: 'http JWKS_URL on a remote host, https issuer', env: { ...secure, JWKS_URL: 'http://keys.example.com/certs' }, has: [HTTP_JWKS], not: [] },
    { name: 'pinned loopback JWKS_URL, http remote issuer', env: { ...secure, JWT_ISSUER: 'http://keycloak.example.com/realms/r', JWKS_URL: 'http://127.0.0.1:8080/certs' }, has: [], not: [HTTP_JWKS] }
  ]
  for (const row of rows) {
    const warnings = configWarnings(load(row.env))
    for (const re of row.has) t.ok(warnings.some((w) => re.test(w)), `${row.name}: warns ${String(re)}`)
    for (const re of row.not) t.notOk(warnings.some((w) => re.test(w)), `${row.name}: does not warn ${String(re)}`)
  }
  t.strictSame(configWarnings(load(secure)), [], 'a secure config has no warnings')
  const noRedis = configWarnings(load({ TLS_CERT: CERT, TLS_KEY: KEY }))
  t.equal(noRedis.length, 1, 'without Redis: exactly one warning')
  t.match(noRedis[0], /REDIS_URL.*per process|per process.*REDIS_URL|rate limits are kept in this process only/, 'the per-process limits warning')
})

t.test('README holds exactly the generated configuration table, once', async (t) => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
  const table = configTable()
  const at = readme.indexOf(table)
  t.not(at, -1, 'the table generated from settings.ts (node scripts/config-table.mjs) is in README.md word for word')
  t.equal(readme.indexOf(table, at + 1), -1, 'only once')
  const end = at + table.length
  t.equal(readme.slice(end, end + 2), '\n\n', 'and nothing but a blank line follows it (no stale rows)')
  for (const leaf of Object.values(LEAVES)) {
    t.equal(readme.split(`| \`${leaf.env}\` |`).length - 1, 1, `${leaf.env} has exactly one row in README`)
  }
})

t.test('README documents every environment variable', async (t) => {
  const readmeUrl = new URL('../README.md', import.meta.url)
  const exists = existsSync(readmeUrl)
  t.ok(exists, 'README.md exists')
  const readme = exists ? readFileSync(readmeUrl, 'utf8') : ''
  const names = [...Object.values(LEAVES).map((leaf) => leaf.env), CONFIG_FILE.env]
  t.equal(new Set(names).size, names.length, 'env names are unique in LEAVES')
  for (const name of names) {
    // whole word: PORT must not be satisfied by ADMIN_PORT
    t.match(readme, new RegExp(`(?<![A-Z0-9_])${name}(?![A-Z0-9_])`), `README mentions ${name}`)
  }
})
