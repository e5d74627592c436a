/**
 * Configuration: YAML file (CONFIG_FILE, default config/gateway.yaml) overlaid by
 * environment variables (env wins), validated all at once, then deep-frozen.
 * Nothing after this reads process.env.
 */
import { accessSync, constants, existsSync, readFileSync, statSync } from 'node:fs'
import { dirname, resolve } from 'node:path'
import { isIP } from 'node:net'
import { parse as parseYaml } from 'yaml'
import { ConfigInvalidError } from '../errors.js'
import { CONFIG_FILE, LEAVES, settingsTree, type Leaf, type LeafPath, type LeafValues, type Settings } from './settings.js'
import { duration, int } from './parsers.js'
import { compileExactPattern, compilePattern, patternError, type PathMatcher } from './patterns.js'

const HTTP_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const
export type HttpMethod = typeof HTTP_METHODS[number]

export interface RoleRule {
  path: string
  /** Empty = every method. */
  methods: HttpMethod[]
  /** The caller needs at least one of these. */
  roles: string[]
  match: PathMatcher
}

export interface RouteLimit {
  path: string
  methods: HttpMethod[]
  max: number
  windowMs: number
  match: PathMatcher
  /** Stable id used in the Redis key (the rule's position in YAML). */
  id: string
}

export interface RoleLimit { role: string, max: number, windowMs: number }

/**
 * The loaded configuration. Every scalar setting sits at its field path with
 * its parser's type (Settings, derived from the LEAVES table in settings.ts);
 * declared here is only what the table cannot say: the TLS pair, the YAML-only
 * rule lists and what is computed from them.
 */
export interface Config extends Settings {
  /** Where the YAML came from (undefined: defaults and env only). */
  source: string | undefined
  /** Every scalar setting as resolved, by YAML path (what check-config prints and a reload compares). */
  leaves: Readonly<LeafValues>
  server: Settings['server'] & {
    /** Both files of server.tls, or undefined: plain HTTP. */
    tls: { cert: string, key: string } | undefined
  }
  auth: Settings['auth'] & {
    publicPaths: string[]
    isPublic: PathMatcher
    routes: RoleRule[]
  }
  rateLimit: Settings['rateLimit'] & {
    /** Most specific first. */
    routes: RouteLimit[]
    /** YAML order: the first role the caller has wins. */
    roles: RoleLimit[]
    exempt: { subs: string[], roles: string[] }
  }
}

type StructuredParser = (raw: unknown, errors: string[]) => unknown
/** YAML keys that are not scalar leaves, each with its parser (below); all of them apply on a reload. */
const STRUCTURED_PARSERS = {
  'auth.publicPaths': (raw, errors) => parsePatternList(raw, 'auth.publicPaths', errors),
  'auth.routes': parseRoleRules,
  'rateLimit.routes': parseRouteLimits,
  'rateLimit.roles': parseRoleLimits,
  'rateLimit.exempt': parseExempt
} satisfies Record<string, StructuredParser>
type Structured = { [K in keyof typeof STRUCTURED_PARSERS]: ReturnType<typeof STRUCTURED_PARSERS[K]> }
export const STRUCTURED = new Set(Object.keys(STRUCTURED_PARSERS))

export interface LoadOptions {
  env?: NodeJS.ProcessEnv
  /** Overrides CONFIG_FILE (used by check-config --file). */
  file?: string
  /** Values used instead of what file and env say (a reload keeps the restart-only settings in force). */
  keep?: Partial<LeafValues>
}

export function loadConfig (opts: LoadOptions = {}): Config {
  const env = opts.env ?? process.env
  const errors: string[] = []
  const { yaml, source } = readYaml(opts.file ?? nonEmpty(env[CONFIG_FILE.env]), errors)
  checkUnknownKeys(yaml, '', errors)
  const values = resolveLeaves(yaml, env, errors)
  if (opts.keep !== undefined) Object.assign(values, opts.keep)
  const structured = parseStructured(yaml, errors)
  checkRelations(values, errors)
  if (errors.length > 0) {
    throw new ConfigInvalidError(errors.map((e) => `  - ${e}`).join('\n'))
  }
  return deepFreeze(assemble(source, values, structured))
}

/**
 * `config` with some scalar settings replaced, assembled exactly as loadConfig
 * assembles (same object shapes), the rule lists kept. Not validated: the
 * caller passes values of the leaves' types (the warm-up's throwaway gateway).
 */
export function withLeaves (config: Config, values: Partial<LeafValues>): Config {
  const { auth, rateLimit } = config
  const structured: Structured = {
    'auth.publicPaths': auth.publicPaths,
    'auth.routes': auth.routes,
    'rateLimit.routes': rateLimit.routes,
    'rateLimit.roles': rateLimit.roles,
    'rateLimit.exempt': rateLimit.exempt
  }
  return deepFreeze(assemble(config.source, { ...config.leaves, ...values }, structured))
}

/** The YAML mapping of the file named (or of the default file when it exists); {} when there is none. */
function readYaml (explicitFile: string | undefined, errors: string[]): { yaml: Record<string, unknown>, source: string | undefined } {
  const file = explicitFile ?? CONFIG_FILE.default
  if (explicitFile === undefined && !existsSync(file)) return { yaml: {}, source: undefined }
  try {
    const doc: unknown = parseYaml(readFileSync(file, 'utf8'), { uniqueKeys: true })
    if (doc === null || doc === undefined) return { yaml: {}, source: file }
    if (isObject(doc)) return { yaml: doc, source: file }
    errors.push(`${file} (${CONFIG_FILE.env}): must be a YAML mapping at the top level`)
    return { yaml: {}, source: file }
  } catch (err) {
    errors.push(`${file} (${CONFIG_FILE.env}): ${(err as Error).message.split('\n')[0]}`)
    return { yaml: {}, source: undefined }
  }
}

/** Each leaf from env, else YAML, else its default; a value that does not parse is an error (and left out). */
function resolveLeaves (yaml: Record<string, unknown>, env: NodeJS.ProcessEnv, errors: string[]): LeafValues {
  const values: Record<string, unknown> = {}
  for (const [path, leaf] of Object.entries(LEAVES) as Array<[LeafPath, Leaf<unknown>]>) {
    const label = labelOf(path)
    const fromEnv = nonEmpty(env[leaf.env])
    const raw = fromEnv ?? getPath(yaml, path)
    if (raw === undefined || raw === null) {
      if (leaf.required === true) errors.push(`${label}: is required`)
      values[path] = leaf.default
      continue
    }
    const parsed = leaf.parse(raw)
    if (parsed.ok) values[path] = parsed.value
    else errors.push(`${label}: ${parsed.error}${fromEnv !== undefined ? ' (from environment)' : ''}`)
  }
  return values as LeafValues
}

/** How an error names a leaf: `upstream.timeout (UPSTREAM_TIMEOUT)`. */
function labelOf (path: LeafPath): string {
  return `${path} (${LEAVES[path].env})`
}

function parseStructured (yaml: Record<string, unknown>, errors: string[]): Structured {
  const out: Record<string, unknown> = {}
  for (const [path, parse] of Object.entries(STRUCTURED_PARSERS) as Array<[string, StructuredParser]>) {
    out[path] = parse(getPath(yaml, path), errors)
  }
  return out as Structured
}

/** Rules between leaves: the TLS pair and its files, the audit file, headers within the request timeout. */
function checkRelations (v: LeafValues, errors: string[]): void {
  const cert = v['server.tls.cert']
  const key = v['server.tls.key']
  if ((cert === undefined) !== (key === undefined)) {
    errors.push(`server.tls (${LEAVES['server.tls.cert'].env}, ${LEAVES['server.tls.key'].env}): set both the certificate and the key, or neither`)
  }
  for (const [path, file] of [['server.tls.cert', cert], ['server.tls.key', key]] as const) {
    if (file !== undefined && !existsSync(file)) errors.push(`${labelOf(path)}: file not found: ${file}`)
  }

  const auditLog = v['audit.log']
  const auditErr = auditLog === 'stdout' || auditLog === 'stderr' ? undefined : auditFileError(auditLog)
  if (auditErr !== undefined) errors.push(`${labelOf('audit.log')}: ${auditErr}`)

  const requestTimeout = v['server.requestTimeout']
  const headersTimeout = v['server.headersTimeout']
  if (requestTimeout !== undefined && headersTimeout !== undefined && headersTimeout > requestTimeout) {
    errors.push(`${labelOf('server.headersTimeout')}: must not be longer than server.requestTimeout (${LEAVES['server.requestTimeout'].env}, ${requestTimeout} ms)`)
  }

  const logoutPath = v['auth.backchannelLogout.path']
  if (logoutPath !== undefined && v['auth.backchannelLogout.listener'] === 'admin' && ADMIN_PATHS.includes(logoutPath)) {
    errors.push(`${labelOf('auth.backchannelLogout.path')}: ${logoutPath} is an admin endpoint already (${ADMIN_PATHS.join(', ')})`)
  }
}

/** The admin listener's own routes (admin/plugin.ts). */
const ADMIN_PATHS = ['/healthz', '/readyz', '/metrics', '/revocations']

/** The Config: the leaves at their field paths, plus the TLS pair, the rule lists and what derives from them. */
function assemble (source: string | undefined, v: LeafValues, s: Structured): Config {
  const settings = settingsTree(v)
  const cert = v['server.tls.cert']
  const key = v['server.tls.key']
  const publicMatchers = s['auth.publicPaths'].map(compileExactPattern)
  return {
    ...settings,
    source,
    leaves: v,
    server: { ...settings.server, tls: cert !== undefined && key !== undefined ? { cert, key } : undefined },
    auth: {
      ...settings.auth,
      // JWT_ROLE_CLIENTS empty: the audiences (check-config prints this effective value).
      roleClients: v['auth.roleClients'].length > 0 ? v['auth.roleClients'] : v['auth.audience'],
      publicPaths: s['auth.publicPaths'],
      isPublic: (p) => publicMatchers.some((m) => m(p)),
      routes: s['auth.routes']
    },
    rateLimit: { ...settings.rateLimit, routes: s['rateLimit.routes'], roles: s['rateLimit.roles'], exempt: s['rateLimit.exempt'] }
  }
}

/** Problems worth a warning at start, not a refusal. */
export function configWarnings (config: Config): string[] {
  const warnings: string[] = []
  if (config.auth.audiences.includes('account')) {
    warnings.push('auth.audience (JWT_AUDIENCE) contains "account": every Keycloak token of the realm carries aud "account", so any client\'s token would be accepted. Add an audience mapper for the gateway\'s client and use its id, or set JWT_ACCEPT_AZP=true with the client id.')
  }
  if (config.server.tls === undefined && !config.server.allowInsecureHttp && config.server.trustProxy === false) {
    warnings.push('no TLS_CERT/TLS_KEY, ALLOW_INSECURE_HTTP=false and TRUST_PROXY=false: every request that carries a token will be refused as plaintext. Terminate TLS here, or behind a trusted proxy that sets X-Forwarded-Proto.')
  }
  const jwksBase = config.auth.jwksUrl ?? config.auth.issuer
  if (jwksBase.startsWith('http:') && !isLoopback(jwksBase)) {
    warnings.push('the JWKS is fetched over plain http from a non-loopback host: a network attacker could substitute signing keys. Use https.')
  }
  if (config.redis.url === undefined && config.redis.clusterNodes.length === 0) {
    warnings.push('no REDIS_URL or REDIS_CLUSTER_NODES: rate limits are kept in this process only, so every replica enforces its own budget. Set REDIS_URL to share one budget per user across replicas.')
  }
  if (config.server.allowInsecureHttp) {
    warnings.push('ALLOW_INSECURE_HTTP=true: bearer tokens are accepted over plaintext. Development only.')
  }
  if (typeof config.server.trustProxy === 'number') {
    warnings.push(`TRUST_PROXY=${config.server.trustProxy} trusts the nearest ${config.server.trustProxy} hop(s) whoever they are: a client that reaches the gateway directly (not through your proxy) chooses its own X-Forwarded-For and X-Forwarded-Proto, and is not held to MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP. Only expose the gateway through the proxy, or list the proxies' addresses or CIDRs instead.`)
  }
  if (config.server.trustProxy === true) {
    warnings.push('TRUST_PROXY=true trusts every hop: any client can send its own X-Forwarded-For and X-Forwarded-Proto, so it chooses the address the per-IP limits and audit lines see (spoofing a victim, or rotating to evade the failed-token limit) and can pass plain HTTP off as https; and no client is held to MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP. Use the proxies\' addresses or CIDRs instead.')
  }
  return warnings
}

/** Why the audit file cannot be appended to (it is opened at start, created when missing), or undefined. */
function auditFileError (file: string): string | undefined {
  try {
    if (existsSync(file)) {
      if (!statSync(file).isFile()) return `not a regular file: ${file}`
      accessSync(file, constants.W_OK)
      return undefined
    }
    const dir = dirname(resolve(file))
    if (!existsSync(dir) || !statSync(dir).isDirectory()) return `directory not found: ${dir}`
    accessSync(dir, constants.W_OK)
    return undefined
  } catch (err) {
    return `cannot write ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`
  }
}

function isLoopback (u: string): boolean {
  const host = new URL(u).hostname
  return host === 'localhost' || host === '[::1]' || (isIP(host) === 4 && host.startsWith('127.'))
}

function parsePatternList (raw: unknown, path: string, errors: string[]): string[] {
  if (raw === undefined || raw === null) return []
  if (!Array.isArray(raw)) {
    errors.push(`${path}: must be a list of path patterns`)
    return []
  }
  const out: string[] = []
  for (const [i, p] of raw.entries()) {
    const err = patternError(p)
    if (err !== undefined) errors.push(`${path}[${i}] (${JSON.stringify(p)}): ${err}`)
    else out.push(p as string)
  }
  return out
}

function parseRoleRules (raw: unknown, errors: string[]): RoleRule[] {
  if (raw === undefined || raw === null) return []
  if (!Array.isArray(raw)) {
    errors.push('auth.routes: must be a list of { path, methods?, roles }')
    return []
  }
  const rules: RoleRule[] = []
  for (const [i, item] of raw.entries()) {
    const at = `auth.routes[${i}]`
    if (!isObject(item)) {
      errors.push(`${at}: must be a mapping { path, methods?, roles }`)
      continue
    }
    checkKeys(item, ['path', 'methods', 'roles'], at, errors)
    const pErr = patternError(item.path)
    if (pErr !== undefined) errors.push(`${at}.path: ${pErr}`)
    const methods = parseMethods(item.methods, `${at}.methods`, errors)
    const roles = item.roles
    const rolesOk = Array.isArray(roles) && roles.length > 0 && roles.every((r) => typeof r === 'string' && r.length > 0)
    if (!rolesOk) errors.push(`${at}.roles: must be a non-empty list of role names`)
    if (pErr === undefined && methods !== undefined && rolesOk) {
      const path = item.path as string
      rules.push({
        path,
        methods,
        roles: roles as string[],
        match: compilePattern(path)
      })
    }
  }
  return rules
}

function parseLimitFields (item: Record<string, unknown>, at: string, errors: string[]): { max: number, windowMs: number } | undefined {
  const max = int(1)(item.max)
  const window = duration(1000)(item.window ?? LEAVES['rateLimit.window'].default)
  if (!max.ok) errors.push(`${at}.max: ${max.error}`)
  if (!window.ok) errors.push(`${at}.window: ${window.error}`)
  return max.ok && window.ok ? { max: max.value, windowMs: window.value } : undefined
}

function checkKeys (item: Record<string, unknown>, allowed: string[], at: string, errors: string[]): void {
  for (const k of Object.keys(item)) if (!allowed.includes(k)) errors.push(`${at}.${k}: unknown key`)
}

function parseRouteLimits (raw: unknown, errors: string[]): RouteLimit[] {
  if (raw === undefined || raw === null) return []
  if (!Array.isArray(raw)) {
    errors.push('rateLimit.routes: must be a list of { path, methods?, max, window? }')
    return []
  }
  const rules: Array<RouteLimit & { specificity: number[] }> = []
  for (const [i, item] of raw.entries()) {
    const at = `rateLimit.routes[${i}]`
    if (!isObject(item)) { errors.push(`${at}: must be a mapping { path, methods?, max, window? }`); continue }
    checkKeys(item, ['path', 'methods', 'max', 'window'], at, errors)
    const pErr = patternError(item.path)
    if (pErr !== undefined) errors.push(`${at}.path: ${pErr}`)
    const methods = parseMethods(item.methods, `${at}.methods`, errors)
    const limit = parseLimitFields(item, at, errors)
    if (pErr === undefined && methods !== undefined && limit !== undefined) {
      const path = item.path as string
      rules.push({ path, methods, ...limit, match: compilePattern(path), id: `r${i}`, specificity: specificity(path, methods) })
    }
  }
  // Most specific first: more literal segments, then no `**`, then fewer `*`, then a method list; ties keep YAML order.
  rules.sort((a, b) => {
    for (let k = 0; k < a.specificity.length; k++) {
      const d = (b.specificity[k] as number) - (a.specificity[k] as number)
      if (d !== 0) return d
    }
    return 0
  })
  return rules.map(({ specificity: _s, ...rule }) => rule)
}

function specificity (path: string, methods: HttpMethod[]): number[] {
  const segs = path.split('/').filter((x) => x !== '')
  return [
    segs.filter((x) => x !== '*' && x !== '**').length,
    segs.includes('**') ? 0 : 1,
    -segs.filter((x) => x === '*').length,
    methods.length > 0 ? 1 : 0
  ]
}

function parseMethods (raw: unknown, at: string, errors: string[]): HttpMethod[] | undefined {
  const methods = raw ?? []
  const ok = Array.isArray(methods) && methods.every((m) => typeof m === 'string' && (HTTP_METHODS as readonly string[]).includes(m.toUpperCase()))
  if (!ok) {
    errors.push(`${at}: must be a list of ${HTTP_METHODS.join(', ')}`)
    return undefined
  }
  return (methods as string[]).map((m) => m.toUpperCase() as HttpMethod)
}

function parseRoleLimits (raw: unknown, errors: string[]): RoleLimit[] {
  if (raw === undefined || raw === null) return []
  if (!Array.isArray(raw)) {
    errors.push('rateLimit.roles: must be a list of { role, max, window? }')
    return []
  }
  const out: RoleLimit[] = []
  for (const [i, item] of raw.entries()) {
    const at = `rateLimit.roles[${i}]`
    if (!isObject(item)) { errors.push(`${at}: must be a mapping { role, max, window? }`); continue }
    checkKeys(item, ['role', 'max', 'window'], at, errors)
    if (typeof item.role !== 'string' || item.role === '') errors.push(`${at}.role: must be a role name`)
    const limit = parseLimitFields(item, at, errors)
    if (typeof item.role === 'string' && item.role !== '' && limit !== undefined) out.push({ role: item.role, ...limit })
  }
  return out
}

function parseExempt (raw: unknown, errors: string[]): { subs: string[], roles: string[] } {
  if (raw === undefined || raw === null) return { subs: [], roles: [] }
  if (!isObject(raw)) {
    errors.push('rateLimit.exempt: must be a mapping { subs?, roles? }')
    return { subs: [], roles: [] }
  }
  checkKeys(raw, ['subs', 'roles'], 'rateLimit.exempt', errors)
  const names = (k: 'subs' | 'roles'): string[] => {
    const v = raw[k] ?? []
    if (!Array.isArray(v) || !v.every((x) => typeof x === 'string' && x !== '')) {
      errors.push(`rateLimit.exempt.${k}: must be a list of names`)
      return []
    }
    return v as string[]
  }
  return { subs: names('subs'), roles: names('roles') }
}

/** Every YAML key must be a known leaf, a structured key, or a parent of one. */
function checkUnknownKeys (node: Record<string, unknown>, prefix: string, errors: string[]): void {
  for (const [k, val] of Object.entries(node)) {
    const path = prefix === '' ? k : `${prefix}.${k}`
    if (k.includes('.')) {
      errors.push(`${path}: unknown key (write nested keys as YAML mappings, not dotted names)`)
      continue
    }
    if (Object.hasOwn(LEAVES, path) || STRUCTURED.has(path)) continue
    const isParent = Object.keys(LEAVES).some((p) => p.startsWith(path + '.')) ||
      [...STRUCTURED].some((p) => p.startsWith(path + '.'))
    if (!isParent) {
      errors.push(`${path}: unknown key`)
    } else if (!isObject(val)) {
      errors.push(`${path}: must be a mapping`)
    } else {
      checkUnknownKeys(val, path, errors)
    }
  }
}

function getPath (obj: Record<string, unknown>, path: string): unknown {
  let cur: unknown = obj
  for (const k of path.split('.')) {
    if (!isObject(cur)) return undefined
    cur = cur[k]
  }
  return cur
}

function isObject (v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

function nonEmpty (s: string | undefined): string | undefined {
  return s === undefined || s.trim() === '' ? undefined : s
}

function deepFreeze<T> (obj: T): T {
  if (typeof obj === 'object' && obj !== null && !Object.isFrozen(obj)) {
    Object.freeze(obj)
    for (const v of Object.values(obj)) deepFreeze(v)
  }
  return obj
}
