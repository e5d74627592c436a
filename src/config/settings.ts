/**
 * Every scalar setting of the gateway: its YAML path, its environment variable,
 * its default, its Config field and what it means. One table (as envoy's
 * settings.go), so the loader, the Config type (Settings below), `check-config`,
 * the reload and the README reference cannot drift apart.
 * Structured settings that env cannot express (publicPaths, routes) are YAML
 * only and validated in load.ts.
 */
import {
  bool, duration, hostPort, int, secretToken, JWT_ALGORITHMS, list, LOG_LEVELS, oneOf, port, seconds, str, trustProxy, url, urlPath,
  type JwtAlgorithm, type LogLevel, type Parser, type TrustProxy
} from './parsers.js'

/**
 * What a reload (SIGHUP, CONFIG_WATCH) does with a setting: `live` settings
 * apply to new requests at once; `restart` settings keep the value the
 * process started with (the reload says which changed, so someone restarts).
 * Decided here only: config/live.ts derives the reload from it, the README
 * table shows it, and test/reload-settings.test.ts changes every live one.
 */
export type Reload = 'live' | 'restart'

export interface Leaf<T> {
  /** Environment variable that overrides the YAML value. */
  env: string
  /**
   * Its name in the loaded Config when that differs from the YAML key's last
   * name, in the same object (`upstream.timeout` with field `timeoutMs` is
   * `config.upstream.timeoutMs`); false: not a Config field of its own, load.ts
   * builds that part (the TLS pair). Absent: the YAML path is the Config path.
   */
  field?: string | false
  reload: Reload
  parse: Parser<T>
  /** Value when neither YAML nor env sets it; undefined = unset (or required). */
  default?: T
  required?: boolean
  /**
   * check-config prints ******** instead of the value. (Every value is shown
   * with a URL's password masked, REDIS_URL's too; TLS_KEY is only the key's path.)
   */
  secret?: boolean
  doc: string
}

/** The declared `field`, kept as a literal type so that the Config type can be derived from the table. */
type Named<F> = { field: F }
/** A leaf that always has a value: a default, or required (the loader refuses to start without it). */
function leaf<T, const F extends string | false | undefined = undefined> (def: Leaf<T> & { field?: F } & ({ default: T } | { required: true })): Leaf<T> & Named<F> {
  return def as Leaf<T> & Named<F>
}
/** A leaf that may stay unset. */
function optional<T, const F extends string | false | undefined = undefined> (def: Leaf<T> & { field?: F }): Leaf<T | undefined> & Named<F> {
  return def as Leaf<T | undefined> & Named<F>
}

export const STORE_ERROR_POLICIES = ['open', 'closed'] as const
export type StoreErrorPolicy = typeof STORE_ERROR_POLICIES[number]
export const LOGOUT_LISTENERS = ['public', 'admin'] as const
export type LogoutListener = typeof LOGOUT_LISTENERS[number]
export const WS_LIMIT_ACTIONS = ['close', 'drop'] as const
export type WsLimitAction = typeof WS_LIMIT_ACTIONS[number]

/** The YAML file itself: named by env only, so not a leaf (the README table's first row). */
export const CONFIG_FILE = {
  env: 'CONFIG_FILE',
  reload: 'restart',
  default: 'config/gateway.yaml',
  doc: 'Path of the YAML file (missing default file = defaults + env; a missing explicit file is an error).'
} as const

/**
 * The table. Keys are YAML paths (dot-separated). Order = README order.
 */
export const LEAVES = {
  'server.host': leaf({ env: 'HOST', reload: 'restart', parse: str, default: '0.0.0.0', doc: 'Interface the public listener binds.' }),
  'server.port': leaf({ env: 'PORT', reload: 'restart', parse: port, default: 8080, doc: 'Public listener port (HTTP and WebSocket).' }),
  'server.tls.cert': optional({ env: 'TLS_CERT', field: false, reload: 'restart', parse: str, doc: 'Path to a PEM certificate chain; with `TLS_KEY` the public listener serves HTTPS.' }),
  'server.tls.key': optional({ env: 'TLS_KEY', field: false, reload: 'restart', parse: str, doc: 'Path to the PEM private key for `TLS_CERT`.' }),
  'server.allowInsecureHttp': leaf({ env: 'ALLOW_INSECURE_HTTP', reload: 'restart', parse: bool, default: false, doc: 'Accept bearer tokens over plain HTTP (development only). Otherwise a token over plaintext is refused with 401, unless it came through a trusted proxy with `X-Forwarded-Proto: https`.' }),
  'server.trustProxy': leaf({ env: 'TRUST_PROXY', reload: 'restart', parse: trustProxy, default: false as TrustProxy, doc: 'Which proxies in front of the gateway to trust for `X-Forwarded-For`/`-Proto`/`-Host`: `false`, a comma list of IPs/CIDRs (recommended), a hop count N (the client is the N-th address from the right of `X-Forwarded-For`, the peer counting as the first), or `true` (every hop). A hop count or `true` lets any client that reaches the gateway directly choose its own address and `X-Forwarded-Proto` (warned at start).' }),
  'server.configWatch': leaf({ env: 'CONFIG_WATCH', reload: 'restart', parse: bool, default: false, doc: 'Reload the YAML file when it changes (SIGHUP always reloads). The Reload column says which settings apply to new requests at once (`live`, and the YAML-only rule lists) and which keep their start value until a restart.' }),
  'server.shutdownDelay': leaf({ env: 'SHUTDOWN_DELAY', field: 'shutdownDelayMs', reload: 'restart', parse: duration(), default: 5_000, doc: 'On SIGTERM, how long `/readyz` reports 503 before the listener stops accepting (lets load balancers drain).' }),
  'server.shutdownTimeout': leaf({ env: 'SHUTDOWN_TIMEOUT', field: 'shutdownTimeoutMs', reload: 'restart', parse: duration(1000), default: 30_000, doc: 'Upper bound for the whole shutdown; the process exits after it even if requests are still open.' }),
  'server.requestTimeout': leaf({ env: 'REQUEST_TIMEOUT', field: 'requestTimeoutMs', reload: 'restart', parse: duration(100), default: 60_000, doc: 'Time a client has to send a whole request, headers and body; after it the connection is closed (408 when nothing was answered yet). Raise it for slow uploads.' }),
  'server.headersTimeout': leaf({ env: 'HEADERS_TIMEOUT', field: 'headersTimeoutMs', reload: 'restart', parse: duration(100), default: 10_000, doc: 'Time a client has to send the request line and headers, counted from the connection or from the end of the previous request; at most `REQUEST_TIMEOUT`.' }),
  // 72 s is Fastify's own default.
  'server.keepAliveTimeout': leaf({ env: 'KEEP_ALIVE_TIMEOUT', field: 'keepAliveTimeoutMs', reload: 'restart', parse: duration(100), default: 72_000, doc: 'An idle keep-alive connection is closed after this long. Keep it above the idle timeout of a load balancer in front (60 s for AWS ALB and nginx) so that it closes first.' }),
  'server.maxConnections': leaf({ env: 'MAX_CONNECTIONS', reload: 'restart', parse: int(0, 1_000_000), default: 0, doc: 'Open client connections (HTTP and WebSocket) the public listener holds; beyond it a new connection is closed at once. 0: derived from the file-descriptor limit, leaving room for the connections to the app, Redis and the JWKS and for one app-side socket per WebSocket (logged at start).' }),
  'server.maxUnauthenticatedPerIp': leaf({ env: 'MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP', reload: 'restart', parse: int(0, 1_000_000), default: 64, doc: 'Open connections per client address (the TCP peer; IPv6 by /64) that have not yet carried an authenticated request; beyond it a new connection from that address is closed at once. Users behind one NAT share the cap only with their connections that have not authenticated yet. A peer that `TRUST_PROXY` trusts (a listed address or CIDR; every peer with `true` or a hop count) is not capped, since behind a load balancer every connection has the address of the balancer; its connections still count towards `MAX_CONNECTIONS`. 0 disables.' }),
  'server.warmup': leaf({ env: 'WARMUP', field: 'warmupMs', reload: 'restart', parse: duration(), default: 0, doc: 'Self warm-up at start (e.g. `2s`; 0: off): before `/readyz` reports 200, this long of synthetic HTTP and WebSocket traffic goes through a throwaway second gateway in the same process (same code and settings; its own loopback issuer, app, key, limits, metrics and a null audit sink: nothing reaches the app, the issuer, Redis, the audit trail or `/metrics`), so that V8 has optimised much of the request path before real traffic arrives. It shortens the slow first seconds of a fresh process but costs about 5% of the steady rate for the life of the process (README, Operations > Health). A failure is a warning and the gateway becomes ready anyway; it is cut off after this long plus 10 s.' }),
  'admin.host': leaf({ env: 'ADMIN_HOST', reload: 'restart', parse: str, default: '127.0.0.1', doc: 'Interface of the admin listener (`/metrics`, `/healthz`, `/readyz`). Keep it private; the container image sets `0.0.0.0`.' }),
  'admin.token': optional({ env: 'ADMIN_TOKEN', reload: 'restart', parse: secretToken, secret: true, doc: 'Bearer secret for the admin API (`POST /revocations`), at least 16 characters. Unset: the admin API answers 404. Metrics and health need no token.' }),
  'admin.port': leaf({ env: 'ADMIN_PORT', reload: 'restart', parse: port, default: 9090, doc: 'Admin listener port. Never served on the public port.' }),
  'upstream.url': leaf({ env: 'UPSTREAM_URL', reload: 'restart', parse: url(['http', 'https']), default: 'http://127.0.0.1:3000', doc: 'Base URL of the app every allowed request is forwarded to (HTTP and WebSocket).' }),
  'upstream.timeout': leaf({ env: 'UPSTREAM_TIMEOUT', field: 'timeoutMs', reload: 'restart', parse: duration(100), default: 30_000, doc: 'Time to wait for the app\'s response headers (and between body chunks) before answering 504.' }),
  'upstream.connectTimeout': leaf({ env: 'UPSTREAM_CONNECT_TIMEOUT', field: 'connectTimeoutMs', reload: 'restart', parse: duration(100), default: 5_000, doc: 'TCP/TLS connect timeout to the app; on expiry the client gets 502.' }),
  'upstream.connections': leaf({ env: 'UPSTREAM_CONNECTIONS', reload: 'restart', parse: int(1, 10_000), default: 128, doc: 'Maximum pooled keep-alive connections to the app.' }),
  'upstream.forwardAuthorization': leaf({ env: 'FORWARD_AUTHORIZATION', reload: 'restart', parse: bool, default: false, doc: 'Forward the client\'s `Authorization` header to the app. Off by default: the app gets the verified identity in `X-User-*` headers instead.' }),
  // Compared to `iss` exactly, trailing slash included.
  'auth.issuer': leaf({ env: 'JWT_ISSUER', reload: 'restart', parse: url(['http', 'https']), required: true, doc: 'Expected `iss`, e.g. `https://keycloak.example.com/realms/myrealm`. OIDC discovery runs at `<JWT_ISSUER>/.well-known/openid-configuration` unless `JWKS_URL` is set.' }),
  'auth.audience': leaf({ env: 'JWT_AUDIENCE', field: 'audiences', reload: 'restart', parse: list(str, { nonEmpty: true }), required: true, doc: 'Accepted audiences (comma list); a token must name at least one in `aud` (or in `azp` when `JWT_ACCEPT_AZP` is on).' }),
  'auth.acceptAzpAsAudience': leaf({ env: 'JWT_ACCEPT_AZP', reload: 'restart', parse: bool, default: false, doc: 'Also accept a token whose `azp` (Keycloak\'s client id) is one of the audiences. For Keycloak realms without an audience mapper (`aud: "account"`).' }),
  'auth.jwksUrl': optional({ env: 'JWKS_URL', reload: 'restart', parse: url(['http', 'https']), doc: 'Pin the JWKS location instead of discovering it. The JWKS location is never taken from a token.' }),
  'auth.algorithms': leaf({ env: 'JWT_ALGORITHMS', reload: 'restart', parse: list(oneOf(JWT_ALGORITHMS), { nonEmpty: true }), default: ['RS256'] as JwtAlgorithm[], doc: `Allowed signature algorithms (comma list of ${JWT_ALGORITHMS.join(', ')}). \`none\` and HMAC are never accepted.` }),
  'auth.clockTolerance': leaf({ env: 'JWT_CLOCK_TOLERANCE', field: 'clockToleranceSec', reload: 'restart', parse: seconds, default: 5, doc: 'Seconds of clock skew allowed on `exp` and `nbf`.' }),
  'auth.roleClients': leaf({ env: 'JWT_ROLE_CLIENTS', reload: 'restart', parse: list(str), default: [] as string[], doc: 'Clients whose `resource_access.<client>.roles` count as roles, named `<client>:<role>` (realm roles keep their plain name). Empty: the audiences.' }),
  'auth.verifyCacheSize': leaf({ env: 'JWT_CACHE_SIZE', reload: 'restart', parse: int(0, 1_000_000), default: 10_000, doc: 'Verified tokens kept (oldest evicted first, never past their `exp`, re-checked against the key set and revocations) so a repeated token skips parsing and the signature check. 0 disables.' }),
  'auth.jwks.cacheTtl': leaf({ env: 'JWKS_CACHE_TTL', field: 'cacheTtlMs', reload: 'restart', parse: duration(1000), default: 10 * 60_000, doc: 'How long a fetched JWKS is fresh; after it the keys are refreshed in the background. Known keys keep working while the JWKS endpoint is down. Also the longest pause between failed fetches (at most 5 min).' }),
  'auth.jwks.minRefreshInterval': leaf({ env: 'JWKS_MIN_REFRESH_INTERVAL', field: 'minRefreshIntervalMs', reload: 'restart', parse: duration(), default: 10_000, doc: 'An unknown `kid` triggers at most one JWKS refetch per interval (single flight); other unknown kids are refused from a negative cache meanwhile. After a failed discovery or JWKS fetch the next attempt waits this long (1 s when 0), doubling per further failure up to `JWKS_CACHE_TTL` (and 5 min), whatever the request rate.' }),
  'auth.jwks.fetchTimeout': leaf({ env: 'JWKS_FETCH_TIMEOUT', field: 'fetchTimeoutMs', reload: 'restart', parse: duration(100), default: 5_000, doc: 'Connect, header and body timeout for discovery and JWKS fetches.' }),
  'auth.revocationMinTtl': leaf({ env: 'REVOCATION_MIN_TTL', field: 'revocationMinTtlMs', reload: 'restart', parse: duration(1000), default: 60 * 60_000, doc: 'A revocation is kept for the longest remaining lifetime of any token the gateways have seen, and at least this long (covers tokens issued but not yet presented).' }),
  'auth.backchannelLogout.path': optional({ env: 'BACKCHANNEL_LOGOUT_PATH', reload: 'restart', parse: urlPath, doc: 'Path of the OpenID Connect Back-Channel Logout endpoint (e.g. `/backchannel-logout`): the issuer POSTs a signed `logout_token` there when a session ends, and the gateway refuses that session\'s tokens on every replica and closes its WebSockets (1008 `session ended`). Unset: off.' }),
  'auth.backchannelLogout.listener': leaf({ env: 'BACKCHANNEL_LOGOUT_LISTENER', reload: 'restart', parse: oneOf(LOGOUT_LISTENERS), default: 'public' as LogoutListener, doc: 'Which listener serves the logout endpoint: `public` (the path is then never proxied and needs no bearer token) or `admin` (reachable only where the admin port is).' }),
  'auth.backchannelLogout.audience': leaf({ env: 'BACKCHANNEL_LOGOUT_AUDIENCE', field: 'audiences', reload: 'restart', parse: list(str), default: [] as string[], doc: 'Client ids accepted in a logout token\'s `aud` (comma list). Keycloak addresses it to the client the user logged in to (the `azp` of its access tokens), not to the API. Empty: the `JWT_AUDIENCE` values.' }),
  'log.level': leaf({ env: 'LOG_LEVEL', reload: 'live', parse: oneOf(LOG_LEVELS), default: 'info' as LogLevel, doc: `Log level: ${LOG_LEVELS.join(', ')}.` }),
  'audit.log': leaf({ env: 'AUDIT_LOG', reload: 'restart', parse: str, default: 'stdout', doc: 'Where the audit trail goes: `stdout`, `stderr` or a file path (appended to, created if missing; its directory must exist and be writable). One JSON line per denial, marked `"log":"audit"`, written synchronously and never filtered by `LOG_LEVEL`. SIGHUP reopens the file (log rotation).' }),
  'redis.clusterNodes': leaf({ env: 'REDIS_CLUSTER_NODES', reload: 'restart', parse: list(hostPort), default: [] as string[], doc: 'Redis Cluster seed nodes (comma list of `host:port`); takes precedence over `REDIS_URL`, whose password/TLS/db settings still apply when it is also set.' }),
  'redis.url': optional({ env: 'REDIS_URL', reload: 'restart', parse: url(['redis', 'rediss']), doc: 'Redis for shared rate limits (`redis://[:password@]host:6379/db`, `rediss://` for TLS). Unset: in-process limits, per replica.' }),
  'rateLimit.max': leaf({ env: 'RATE_LIMIT_MAX', reload: 'live', parse: int(1), default: 100, doc: 'Requests (HTTP and WebSocket upgrades) per user (`sub`) per window.' }),
  'rateLimit.window': leaf({ env: 'RATE_LIMIT_WINDOW', field: 'windowMs', reload: 'live', parse: duration(1000), default: 60_000, doc: 'Rate-limit window: milliseconds or a duration (`60s`, `1m`). Fixed windows: the budget resets when the window ends.' }),
  'rateLimit.keyPrefix': leaf({ env: 'RATE_LIMIT_KEY_PREFIX', reload: 'restart', parse: str, default: 'resonance:rl:', doc: 'Prefix of every rate-limit key in Redis, so several gateways (or environments) can share one Redis.' }),
  'rateLimit.onStoreError': leaf({ env: 'RATE_LIMIT_ON_STORE_ERROR', reload: 'restart', parse: oneOf(STORE_ERROR_POLICIES), default: 'open' as StoreErrorPolicy, doc: 'When Redis is down or slow: `open` serves requests but counts them in a per-process fallback limit; `closed` answers 503 with `Retry-After`.' }),
  'rateLimit.fallbackMax': optional({ env: 'RATE_LIMIT_FALLBACK_MAX', reload: 'restart', parse: int(1), doc: 'Per-process budget per user and window while Redis is unavailable (policy `open`). Unset: the normal budget, per replica; set it to the budget divided by the number of replicas to keep the total exact.' }),
  'rateLimit.authFailures.max': leaf({ env: 'AUTH_FAILURE_LIMIT_MAX', reload: 'live', parse: int(1), default: 300, doc: 'Presented tokens that fail verification, per client IP per window (requests without a token never count). Beyond it the IP\'s failing tokens get 429, tokens with an unknown `kid` are refused without a JWKS fetch, and valid tokens are still served. Generous on purpose: many users behind one NAT with expired tokens are normal.' }),
  'ws.maxPayload': leaf({ env: 'WS_MAX_PAYLOAD', reload: 'restart', parse: int(1, 64 * 1024 * 1024), default: 1024 * 1024, doc: 'Largest WebSocket message (bytes) accepted from a client or the app; larger ones close the connection with 1009.' }),
  'ws.maxBuffered': leaf({ env: 'WS_MAX_BUFFERED', reload: 'restart', parse: int(1024, 256 * 1024 * 1024), default: 1024 * 1024, doc: 'Bytes queued towards one side of a WebSocket before the other side is paused (backpressure): a slow reader cannot grow memory without limit.' }),
  'ws.messageLimit.max': leaf({ env: 'WS_MESSAGE_LIMIT_MAX', reload: 'live', parse: int(1), default: 600, doc: 'Client-to-app WebSocket messages per user per window, shared by all of the user\'s connections and all replicas.' }),
  'ws.messageLimit.window': leaf({ env: 'WS_MESSAGE_LIMIT_WINDOW', field: 'windowMs', reload: 'live', parse: duration(1000), default: 60_000, doc: 'Window of the WebSocket message limit.' }),
  'ws.messageLimit.action': leaf({ env: 'WS_MESSAGE_LIMIT_ACTION', reload: 'live', parse: oneOf(WS_LIMIT_ACTIONS), default: 'close' as WsLimitAction, doc: 'Over the message limit: `close` closes the connection with 1008; `drop` drops the message and sends the client a `{"error":"rate_limited"}` text message.' }),
  'ws.maxConnectionsPerUser': leaf({ env: 'WS_MAX_CONNECTIONS_PER_USER', reload: 'live', parse: int(1), default: 10, doc: 'Concurrent WebSocket connections per user across replicas; the next upgrade gets 429. Slots of a dead replica expire within a minute.' }),
  'ws.pingInterval': leaf({ env: 'WS_PING_INTERVAL', field: 'pingIntervalMs', reload: 'restart', parse: duration(1000), default: 30_000, doc: 'The gateway pings each client this often; a client that has not answered the previous ping is disconnected.' }),
  'ws.idleTimeout': leaf({ env: 'WS_IDLE_TIMEOUT', field: 'idleTimeoutMs', reload: 'restart', parse: duration(), default: 10 * 60_000, doc: 'Close a WebSocket (1000 "idle timeout") after this long without a message in either direction; 0 disables.' }),
  'rateLimit.authFailures.window': leaf({ env: 'AUTH_FAILURE_LIMIT_WINDOW', field: 'windowMs', reload: 'live', parse: duration(1000), default: 60_000, doc: 'Window of the auth-failure limit.' })
} as const

export type LeafPath = keyof typeof LEAVES
type LeafValue<P extends LeafPath> = typeof LEAVES[P] extends Leaf<infer T> ? T : never
/** Resolved scalar values by YAML path; optional leaves may be undefined. */
export type LeafValues = { [P in LeafPath]: LeafValue<P> }

// The scalar part of the loaded Config, derived from the table: each leaf at its
// field path with its parser's type, so a new leaf is one line above and nothing else.

/** `a.b.c` with the last name replaced: Renamed<'upstream.timeout', 'timeoutMs'> = 'upstream.timeoutMs'. */
type Renamed<P extends string, F extends string> = P extends `${infer H}.${infer R}` ? `${H}.${Renamed<R, F>}` : F
type FieldOf<P extends LeafPath> = typeof LEAVES[P] extends Named<infer F> ? F : undefined
/** Where a leaf sits in the Config (never: field false, load.ts builds that part). */
type FieldPath<P extends LeafPath> = FieldOf<P> extends string ? Renamed<P, FieldOf<P>> : FieldOf<P> extends false ? never : P
/** Leaf values by Config path. */
type ByField = { [P in LeafPath as FieldPath<P>]: LeafValue<P> }
type Head<K> = K extends `${infer H}.${string}` ? H : never
/** The entries of M under `H.`, with that prefix removed. */
type Under<M, H extends string> = { [K in keyof M as K extends `${H}.${infer R}` ? R : never]: M[K] }
/** Dotted paths to nested objects: { 'a.b': X, c: Y } -> { a: { b: X }, c: Y }. */
type Nested<M> = {
  [K in keyof M as K extends `${string}.${string}` ? never : K]: M[K]
} & { [H in Head<keyof M>]: Nested<Under<M, H>> } extends infer O ? { [K in keyof O]: O[K] } : never
/** Every scalar setting, nested by its Config path (load.ts's Config extends it). */
export type Settings = Nested<ByField>

/** The Config path of a leaf (what FieldPath says at the type level), or undefined when its field is false. */
export function fieldPath (path: LeafPath): string | undefined {
  const field = (LEAVES[path] as Leaf<unknown>).field
  if (field === false) return undefined
  return field === undefined ? path : path.slice(0, path.lastIndexOf('.') + 1) + field
}

/** The resolved values put at their Config paths. */
export function settingsTree (values: LeafValues): Settings {
  const tree: Record<string, unknown> = {}
  for (const path of Object.keys(LEAVES) as LeafPath[]) {
    const at = fieldPath(path)?.split('.')
    if (at === undefined) continue
    const name = at.pop() as string
    let node = tree
    for (const k of at) node = (node[k] ??= {}) as Record<string, unknown>
    node[name] = values[path]
  }
  return tree as Settings
}
