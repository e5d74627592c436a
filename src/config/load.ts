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
import { LEAVES, type LeafPath, type LeafValues } from './settings.js'
import { duration, int, type JwtAlgorithm, type LogLevel, type TrustProxy } from './parsers.js'
import type { StoreErrorPolicy, WsLimitAction } from './settings.js'
import { compileExactPattern, compilePattern, patternError, type PathMatcher } from './patterns.js'

export const DEFAULT_CONFIG_FILE = 'config/gateway.yaml'

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

export interface Config {
  /** Where the YAML came from (undefined: defaults and env only). */
  source: string | undefined
  /** Every scalar setting as resolved, by YAML path (what check-config prints and a reload compares). */
  leaves: Readonly<LeafValues>
  server: {
    host: string
    port: number
    tls: { cert: string, key: string } | undefined
    allowInsecureHttp: boolean
    trustProxy: TrustProxy
    shutdownDelayMs: number
    shutdownTimeoutMs: number
    configWatch: boolean
    /** Whole request (headers and body) received within this. */
    requestTimeoutMs: number
    /** Request line and headers received within this; <= requestTimeoutMs. */
    headersTimeoutMs: number
    keepAliveTimeoutMs: number
    /** Open client connections; 0 = derived from the file-descriptor limit at start. */
    maxConnections: number
    /** Open not-yet-authenticated connections per client address; 0 = no limit. */
    maxUnauthenticatedPerIp: number
  }
  admin: { host: string, port: number, token: string | undefined }
  upstream: {
    url: string
    timeoutMs: number
    connectTimeoutMs: number
    connections: number
    forwardAuthorization: boolean
  }
  auth: {
    issuer: string
    audiences: string[]
    acceptAzpAsAudience: boolean
    jwksUrl: string | undefined
    algorithms: JwtAlgorithm[]
    clockToleranceSec: number
    roleClients: string[]
    verifyCacheSize: number
    jwks: { cacheTtlMs: number, minRefreshIntervalMs: number, fetchTimeoutMs: number }
    publicPaths: string[]
    isPublic: PathMatcher
    routes: RoleRule[]
    revocationMinTtlMs: number
  }
  ws: {
    maxPayload: number
    maxBuffered: number
    messageLimit: { max: number, windowMs: number, action: WsLimitAction }
    maxConnectionsPerUser: number
    pingIntervalMs: number
    idleTimeoutMs: number
  }
  log: { level: LogLevel }
  /** The audit trail's destination: 'stdout', 'stderr' or a file path (observability/audit.ts). */
  audit: { log: string }
  redis: { url: string | undefined, clusterNodes: string[] }
  rateLimit: {
    max: number
    windowMs: number
    keyPrefix: string
    onStoreError: StoreErrorPolicy
    fallbackMax: number | undefined
    authFailures: { max: number, windowMs: number }
    /** Most specific first. */
    routes: RouteLimit[]
    /** YAML order: the first role the caller has wins. */
    roles: RoleLimit[]
    exempt: { subs: string[], roles: string[] }
  }
}

/** YAML keys that are not scalar leaves (validated below); all of them apply on a reload. */
export const STRUCTURED = new Set(['auth.publicPaths', 'auth.routes', 'rateLimit.routes', 'rateLimit.roles', 'rateLimit.exempt'])

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
  const explicitFile = opts.file ?? nonEmpty(env.CONFIG_FILE)
  const file = explicitFile ?? DEFAULT_CONFIG_FILE
  let yaml: Record<string, unknown> = {}
  let source: string | undefined
  if (explicitFile !== undefined || existsSync(file)) {
    try {
      const doc: unknown = parseYaml(readFileSync(file, 'utf8'), { uniqueKeys: true })
      source = file
      if (doc === null || doc === undefined) yaml = {}
      else if (isObject(doc)) yaml = doc
      else errors.push(`${file} (CONFIG_FILE): must be a YAML mapping at the top level`)
    } catch (err) {
      errors.push(`${file} (CONFIG_FILE): ${(err as Error).message.split('\n')[0]}`)
    }
  }

  checkUnknownKeys(yaml, '', errors)

  const values: Record<string, unknown> = {}
  for (const [path, leaf] of Object.entries(LEAVES) as Array<[LeafPath, typeof LEAVES[LeafPath]]>) {
    const label = `${path} (${leaf.env})`
    const fromEnv = nonEmpty(env[leaf.env])
    const raw = fromEnv ?? getPath(yaml, path)
    if (raw === undefined || raw === null) {
      if ('required' in leaf && leaf.required === true) errors.push(`${label}: is required`)
      values[path] = 'default' in leaf ? leaf.default : undefined
      continue
    }
    const parsed = leaf.parse(raw)
    if (parsed.ok) values[path] = parsed.value
    else errors.push(`${label}: ${parsed.error}${fromEnv !== undefined ? ' (from environment)' : ''}`)
  }
  if (opts.keep !== undefined) Object.assign(values, opts.keep)
  const v = values as LeafValues

  const publicPaths = parsePatternList(getPath(yaml, 'auth.publicPaths'), 'auth.publicPaths', errors)
  const routes = parseRoleRules(getPath(yaml, 'auth.routes'), errors)
  const routeLimits = parseRouteLimits(getPath(yaml, 'rateLimit.routes'), errors)
  const roleLimits = parseRoleLimits(getPath(yaml, 'rateLimit.roles'), errors)
  const exempt = parseExempt(getPath(yaml, 'rateLimit.exempt'), errors)

  const cert = v['server.tls.cert']
  const key = v['server.tls.key']
  if ((cert === undefined) !== (key === undefined)) {
    errors.push('server.tls (TLS_CERT, TLS_KEY): set both the certificate and the key, or neither')
  }
  for (const [path, file] of [['server.tls.cert (TLS_CERT)', cert], ['server.tls.key (TLS_KEY)', key]] as const) {
    if (file !== undefined && !existsSync(file)) errors.push(`${path}: file not found: ${file}`)
  }

  const auditLog = v['audit.log']
  const auditErr = auditLog === 'stdout' || auditLog === 'stderr' ? undefined : auditFileError(auditLog)
  if (auditErr !== undefined) errors.push(`audit.log (AUDIT_LOG): ${auditErr}`)

  const requestTimeout = v['server.requestTimeout']
  const headersTimeout = v['server.headersTimeout']
  if (requestTimeout !== undefined && headersTimeout !== undefined && headersTimeout > requestTimeout) {
    errors.push(`server.headersTimeout (HEADERS_TIMEOUT): must not be longer than server.requestTimeout (REQUEST_TIMEOUT, ${requestTimeout} ms)`)
  }

  if (errors.length > 0) {
    throw new ConfigInvalidError(errors.map((e) => `  - ${e}`).join('\n'))
  }

  const publicMatchers = publicPaths.map(compileExactPattern)
  const config: Config = {
    source,
    leaves: v,
    server: {
      host: v['server.host'],
      port: v['server.port'],
      tls: cert !== undefined && key !== undefined ? { cert, key } : undefined,
      allowInsecureHttp: v['server.allowInsecureHttp'],
      trustProxy: v['server.trustProxy'],
      shutdownDelayMs: v['server.shutdownDelay'],
      shutdownTimeoutMs: v['server.shutdownTimeout'],
      configWatch: v['server.configWatch'],
      requestTimeoutMs: v['server.requestTimeout'],
      headersTimeoutMs: v['server.headersTimeout'],
      keepAliveTimeoutMs: v['server.keepAliveTimeout'],
      maxConnections: v['server.maxConnections'],
      maxUnauthenticatedPerIp: v['server.maxUnauthenticatedPerIp']
    },
    admin: { host: v['admin.host'], port: v['admin.port'], token: v['admin.token'] },
    upstream: {
      url: v['upstream.url'],
      timeoutMs: v['upstream.timeout'],
      connectTimeoutMs: v['upstream.connectTimeout'],
      connections: v['upstream.connections'],
      forwardAuthorization: v['upstream.forwardAuthorization']
    },
    auth: {
      issuer: v['auth.issuer'], // compared to `iss` exactly, trailing slash included
      audiences: v['auth.audience'],
      acceptAzpAsAudience: v['auth.acceptAzpAsAudience'],
      jwksUrl: v['auth.jwksUrl'],
      algorithms: v['auth.algorithms'],
      clockToleranceSec: v['auth.clockTolerance'],
      roleClients: v['auth.roleClients'].length > 0 ? v['auth.roleClients'] : v['auth.audience'],
      verifyCacheSize: v['auth.verifyCacheSize'],
      jwks: {
        cacheTtlMs: v['auth.jwks.cacheTtl'],
        minRefreshIntervalMs: v['auth.jwks.minRefreshInterval'],
        fetchTimeoutMs: v['auth.jwks.fetchTimeout']
      },
      publicPaths,
      isPublic: (p) => publicMatchers.some((m) => m(p)),
      routes,
      revocationMinTtlMs: v['auth.revocationMinTtl']
    },
    ws: {
      maxPayload: v['ws.maxPayload'],
      maxBuffered: v['ws.maxBuffered'],
      messageLimit: { max: v['ws.messageLimit.max'], windowMs: v['ws.messageLimit.window'], action: v['ws.messageLimit.action'] },
      maxConnectionsPerUser: v['ws.maxConnectionsPerUser'],
      pingIntervalMs: v['ws.pingInterval'],
      idleTimeoutMs: v['ws.idleTimeout']
    },
    log: { level: v['log.level'] },
    audit: { log: v['audit.log'] },
    redis: { url: v['redis.url'], clusterNodes: v['redis.clusterNodes'] },
    rateLimit: {
      max: v['rateLimit.max'],
      windowMs: v['rateLimit.window'],
      keyPrefix: v['rateLimit.keyPrefix'],
      onStoreError: v['rateLimit.onStoreError'],
      fallbackMax: v['rateLimit.fallbackMax'],
      authFailures: { max: v['rateLimit.authFailures.max'], windowMs: v['rateLimit.authFailures.window'] },
      routes: routeLimits,
      roles: roleLimits,
      exempt
    }
  }
  return deepFreeze(config)
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
    warnings.push(`TRUST_PROXY=${config.server.trustProxy} trusts the nearest ${config.server.trustProxy} hop(s) whoever they are: a client that reaches the gateway directly (not through your proxy) chooses its own X-Forwarded-For and X-Forwarded-Proto. Only expose the gateway through the proxy, or list the proxies' addresses or CIDRs instead.`)
  }
  if (config.server.trustProxy === true) {
    warnings.push('TRUST_PROXY=true trusts every hop: any client can send its own X-Forwarded-For and X-Forwarded-Proto, so it chooses the address the per-IP limits and audit lines see (spoofing a victim, or rotating to evade the failed-token limit) and can pass plain HTTP off as https. Use the proxies\' addresses or CIDRs instead.')
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
