// Deployment assets, checked without a Docker engine or a cluster: the compose file (docker-compose config -q, every
// bind-mounted file exists and parses, pinned images, healthchecks, start order, nothing installed at start), the
// Keycloak realm, the Grafana dashboard and the Prometheus rules (every metric and label they use exists in
// src/observability/metrics.ts; every alert has a promtool test case; promtool when installed), the Kubernetes
// sidecar manifests (the ConfigMap's YAML passes the gateway's own validation) and the Dockerfiles' shape (Node 24,
// the same version in every image, `engines` satisfied by it, the version .ci/run tests on).
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, extname, join, posix } from 'node:path'
import { fileURLToPath } from 'node:url'
import t from 'tap'
import { parse as parseYaml, parseAllDocuments } from 'yaml'
import { loadConfig } from '../src/config/load.js'
import { createMetrics } from '../src/observability/metrics.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const COMPOSE_FILE = join(ROOT, 'docker-compose.yml')
const REALM_FILE = join(ROOT, 'config', 'keycloak', 'flappyjournal-realm.json')
const DASHBOARD_FILE = join(ROOT, 'deploy', 'grafana', 'dashboards', 'resonance-gateway.json')
const DATASOURCE_FILE = join(ROOT, 'deploy', 'grafana', 'provisioning', 'datasources', 'prometheus.yml')
const PROMETHEUS_FILE = join(ROOT, 'deploy', 'prometheus', 'prometheus.yml')
const ALERTS_FILE = join(ROOT, 'deploy', 'prometheus', 'alerts.yml')
const ALERT_TESTS_FILE = join(ROOT, 'deploy', 'prometheus', 'alerts.test.yml')
const K8S_DIR = join(ROOT, 'deploy', 'kubernetes')
const DOCKERFILE = join(ROOT, 'Dockerfile')
const STANDIN_DIR = join(ROOT, 'deploy', 'standin-app')
const README = readFileSync(join(ROOT, 'README.md'), 'utf8')

const DOCKER_COMPOSE = ['/usr/bin/docker-compose', '/usr/local/bin/docker-compose'].find((p) => existsSync(p))
const PROMTOOL = ['/usr/bin/promtool', '/usr/local/bin/promtool'].find((p) => existsSync(p))
const CLEAN_ENV = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? ROOT }

type Any = any

function readYaml (file: string): Any {
  return parseYaml(readFileSync(file, 'utf8'), { uniqueKeys: true })
}

// ---------------------------------------------------------------------------------------------------------------
// Metrics the gateway really exports: names, label names, histograms (from the code, not from a list in this test).
// ---------------------------------------------------------------------------------------------------------------

interface MetricInfo { labels: Set<string>, histogram: boolean }
const METRICS = new Map<string, MetricInfo>()
for (const m of createMetrics().registry.getMetricsAsArray() as unknown as Array<{ name: string, type?: string, labelNames?: readonly string[] }>) {
  METRICS.set(m.name, { labels: new Set(m.labelNames ?? []), histogram: m.type === 'histogram' })
}
/** Labels Prometheus adds to every scraped series (job, instance) and our static target labels. */
const TARGET_LABELS = new Set(['job', 'instance', 'service'])
/** Series of Prometheus itself that rules may use. */
const BUILTIN_SERIES = new Set(['up'])

interface ExprCheck { metrics: string[], problems: string[] }

/** Which of our metrics an expression uses, and what in it does not exist (unknown metric or label). */
function checkExpr (expr: string): ExprCheck {
  const problems: string[] = []
  const used = new Map<string, MetricInfo>()
  for (const [name] of expr.matchAll(/\b(?:resonance|process)_[a-z0-9_]+\b/g)) {
    const base = name.replace(/_(bucket|sum|count)$/, '')
    const info = METRICS.get(name) ?? (METRICS.get(base)?.histogram === true ? METRICS.get(base) : undefined)
    if (info === undefined) problems.push(`unknown metric ${name}`)
    else used.set(name, info)
  }
  if (/\bup\b/.test(expr) && BUILTIN_SERIES.has('up')) used.set('up', { labels: new Set(), histogram: false })
  const allowed = new Set(TARGET_LABELS)
  for (const [name, info] of used) {
    for (const l of info.labels) allowed.add(l)
    if (name.endsWith('_bucket')) allowed.add('le')
  }
  const labels: string[] = []
  for (const m of expr.matchAll(/\b(?:by|without)\s*\(([^)]*)\)/g)) labels.push(...(m[1] as string).split(',').map((s) => s.trim()).filter((s) => s !== ''))
  for (const m of expr.matchAll(/\{([^}]*)\}/g)) {
    for (const l of (m[1] as string).matchAll(/([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)/g)) labels.push(l[1] as string)
  }
  for (const l of labels) if (!allowed.has(l)) problems.push(`label ${l} is not a label of ${[...used.keys()].join(', ') || '(no metric)'}`)
  if (used.size === 0) problems.push('uses none of the gateway\'s metrics')
  return { metrics: [...used.keys()].map((n) => n.replace(/_(bucket|sum|count)$/, '')), problems }
}

t.test('the expression checker itself catches unknown metrics and labels', async (t) => {
  t.same(checkExpr('sum by (status_class) (rate(resonance_http_requests_total[5m]))').problems, [])
  t.same(checkExpr('histogram_quantile(0.9, sum by (le) (rate(resonance_http_request_duration_seconds_bucket[5m])))').problems, [])
  t.match(checkExpr('rate(resonance_http_requests_totl[5m])').problems, ['unknown metric resonance_http_requests_totl'])
  t.match(checkExpr('sum by (reason) (rate(resonance_rate_limit_triggered_total[5m]))').problems, [/label reason/])
  t.match(checkExpr('resonance_jwks_fetches_total{outcome="error"}').problems, [/label outcome/])
  t.same(checkExpr('max by (instance) (resonance_connections_open) > max by (instance) (process_max_fds) / 2').problems, [])
  t.match(checkExpr('resonance_connections_open > process_max_fd').problems, ['unknown metric process_max_fd'])
  t.ok(METRICS.size >= 14, 'metrics come from createMetrics()')
})

// ---------------------------------------------------------------------------------------------------------------
// docker-compose.yml
// ---------------------------------------------------------------------------------------------------------------

const compose = readYaml(COMPOSE_FILE)
const services = compose.services as Record<string, Any>

t.test('docker-compose config -q passes with no environment variable set', { skip: DOCKER_COMPOSE === undefined ? 'docker-compose is not installed (Debian package docker-compose): only the static checks run' : false }, async (t) => {
  const r = spawnSync(DOCKER_COMPOSE as string, ['-f', COMPOSE_FILE, 'config', '-q'], { cwd: ROOT, env: CLEAN_ENV, encoding: 'utf8' })
  t.equal(r.status, 0, `docker-compose config -q: ${r.stderr}`)
  // And the resolved file: the defaults give the gateway a working configuration.
  const resolved = spawnSync(DOCKER_COMPOSE as string, ['-f', COMPOSE_FILE, 'config'], { cwd: ROOT, env: CLEAN_ENV, encoding: 'utf8' })
  t.equal(resolved.status, 0)
  const doc = parseYaml(resolved.stdout) as Any
  const env = doc.services.gateway.environment as Record<string, string>
  t.equal(env.JWT_ISSUER, 'http://localhost:8180/realms/flappyjournal', 'JWT_ISSUER defaults to the bundled realm')
  t.equal(env.JWKS_URL, 'http://keycloak:8080/realms/flappyjournal/protocol/openid-connect/certs', 'JWKS pinned to the in-network Keycloak')
  t.equal(doc.services.keycloak.environment.KC_HOSTNAME, 'http://localhost:8180', 'Keycloak stamps the same issuer for everyone')
  // What the gateway container would be started with passes the gateway's validation.
  const config = loadConfig({ env: { ...env, CONFIG_FILE: join(ROOT, 'config', 'gateway.yaml') } })
  t.equal(config.auth.issuer, env.JWT_ISSUER)
  t.equal(config.redis.url, 'redis://redis:6379/0')
  t.equal(config.upstream.url, 'http://app:3000')

  const overridden = spawnSync(DOCKER_COMPOSE as string, ['-f', COMPOSE_FILE, 'config'], {
    cwd: ROOT, env: { ...CLEAN_ENV, APP_IMAGE: 'registry.example.com/flappyjournal:1.2.3', APP_COMMAND: 'node server.js' }, encoding: 'utf8'
  })
  const app = (parseYaml(overridden.stdout) as Any).services.app
  t.equal(app.image, 'registry.example.com/flappyjournal:1.2.3', 'APP_IMAGE swaps in the real app')
})

t.test('compose services: the system, pinned images, healthchecks, start order', async (t) => {
  t.same(Object.keys(services).sort(), ['app', 'gateway', 'grafana', 'keycloak', 'prometheus', 'redis'])
  for (const [name, s] of Object.entries(services)) {
    if (s.image === undefined || s.build !== undefined) continue // built from this repository
    const image = String(s.image)
    t.notMatch(image, /:latest$/, `${name}: no :latest`)
    t.match(image, /:(\$\{[A-Z_]+:-)?[\w.-]*\d[\w.-]*\}?$/, `${name}: image tag pinned to a version (${image})`)
  }
  t.match(services.keycloak.image, /^quay\.io\/keycloak\/keycloak:\$\{KEYCLOAK_VERSION:-26\.\d+\.\d+\}$/)
  t.equal(services.redis.image, 'redis:7.2-alpine')
  for (const name of ['gateway', 'redis', 'keycloak', 'prometheus', 'grafana']) {
    t.ok(Array.isArray(services[name].healthcheck?.test), `${name} has a healthcheck`)
  }
  t.ok(Array.isArray(services.app.healthcheck?.test), 'app has a healthcheck')
  t.same(services.gateway.depends_on, { redis: { condition: 'service_healthy' }, keycloak: { condition: 'service_healthy' }, app: { condition: 'service_healthy' } },
    'the gateway starts once Redis, Keycloak and the app answer (no 502s for its first requests)')
  t.equal(services.grafana.depends_on.prometheus.condition, 'service_healthy')
  t.same(services.keycloak.command, ['start-dev', '--import-realm'])
  t.match(services.app.image, /\$\{APP_IMAGE:-/, 'the app image is overridable')
  t.match(services.gateway.environment.JWT_ISSUER, /^\$\{JWT_ISSUER:-http:\/\/localhost:8180\/realms\/flappyjournal\}$/, 'JWT_ISSUER has a default')
  t.equal(services.gateway.environment.UPSTREAM_URL, 'http://app:3000')
  t.equal(services.gateway.environment.REDIS_URL, 'redis://redis:6379/0')
  t.match(services.keycloak.ports, ['8180:8080'], 'Keycloak on the host port of the issuer URL')
  t.match(services.prometheus.ports[0], /:9090$/)
  t.match(services.grafana.ports[0], /:3000$/)

  // Host ports: each default overridable by a variable the README names, none on 3000 (where an app run on the host,
  // as in the README's own example, listens), no two alike.
  const hostPorts = new Map<string, string>()
  for (const [name, s] of Object.entries(services)) {
    for (const p of (s.ports ?? []) as string[]) {
      const host = /^"?(.*):\d+$/.exec(p)?.[1] as string
      const m = /^\$\{([A-Z_]+):-(\d+)\}$/.exec(host)
      const port = m?.[2] ?? host
      t.not(port, '3000', `${name}: host port ${port} is not 3000`)
      t.notOk(hostPorts.has(port), `${name}: host port ${port} is not used twice`)
      hostPorts.set(port, name)
      if (m !== null) t.ok(README.includes(`\`${m[1] as string}\``), `${name}: ${m[1] as string} is documented in the README`)
    }
  }
  t.match(services.grafana.ports[0], /^\$\{GRAFANA_PORT:-3001\}:3000$/, 'Grafana on host port 3001 by default')
  t.match(services.gateway.ports[0], /^\$\{GATEWAY_PORT:-8080\}:8080$/)
  t.match(services.prometheus.ports[0], /^\$\{PROMETHEUS_PORT:-9091\}:9090$/)
})

t.test('compose: nothing is installed when a container starts; the stand-in app is built with its locked dependency', async (t) => {
  for (const [name, s] of Object.entries(services)) {
    const start = [s.command, s.entrypoint].flat().filter((x) => x !== undefined).join(' ')
    t.notMatch(start, /\b(npm|yarn|pnpm|npx)\b/, `${name}: no package manager at start (${start || 'image default'})`)
  }
  t.equal(services.app.build, './deploy/standin-app', 'the stand-in app is built from deploy/standin-app')
  t.match(services.app.image, /^\$\{APP_IMAGE:-[a-z0-9-]+:[\w.-]+\}$/, 'APP_IMAGE still swaps in the real app')
  t.match(services.app.command, /^\$\{APP_COMMAND:-node server\.mjs\}$/)
  t.notOk('volumes' in services.app, 'server.mjs is in the image, not mounted')
  const dockerfile = readFileSync(join(STANDIN_DIR, 'Dockerfile'), 'utf8')
  t.match(dockerfile, /^COPY package\.json package-lock\.json \.\/$/m, 'the lock file goes into the image')
  t.match(dockerfile, /^RUN npm ci --omit=dev\b/m, 'dependencies installed from the lock at build time')
  t.match(dockerfile, /^COPY server\.mjs \.\/$/m)
  t.match(dockerfile, /^USER node$/m, 'non-root')
  t.match(dockerfile, /^HEALTHCHECK\s/m)
  t.match(dockerfile, /^CMD \["node", "server\.mjs"\]$/m)
  const lock = JSON.parse(readFileSync(join(STANDIN_DIR, 'package-lock.json'), 'utf8')) as Any
  const rootLock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as Any
  const pkg = JSON.parse(readFileSync(join(STANDIN_DIR, 'package.json'), 'utf8')) as Any
  t.same(Object.keys(pkg.dependencies), ['ws'], 'its one dependency')
  t.same(Object.keys(lock.packages).sort(), ['', 'node_modules/ws'], 'locked, nothing else')
  t.equal(lock.packages['node_modules/ws'].version, rootLock.packages['node_modules/ws'].version, 'the ws version the gateway\'s lock pins (the demo runs server.mjs with that one)')
  t.equal(pkg.dependencies.ws, lock.packages['node_modules/ws'].version)
  // What the image runs parses, and imports only node: builtins and ws.
  const server = readFileSync(join(STANDIN_DIR, 'server.mjs'), 'utf8')
  const imports = [...server.matchAll(/^import .* from '([^']+)'$/gm)].map((m) => m[1] as string)
  t.same(imports.filter((i) => !i.startsWith('node:')), ['ws'], `imports: ${imports.join(', ')}`)
})

/** `./host/path:/container/path[:ro]` bind mounts of every service. */
const mounts: Array<{ service: string, host: string, container: string }> = []
for (const [service, s] of Object.entries(services)) {
  for (const v of (s.volumes ?? []) as string[]) {
    const [host, container] = v.split(':')
    if (host !== undefined && container !== undefined && (host.startsWith('./') || host.startsWith('/'))) mounts.push({ service, host, container })
  }
}

t.test('every bind-mounted file exists and parses', async (t) => {
  t.ok(mounts.length >= 6, `${mounts.length} bind mounts`)
  for (const m of mounts) {
    const file = join(ROOT, m.host)
    t.ok(existsSync(file), `${m.service}: ${m.host} exists`)
    if (!existsSync(file)) continue
    const text = readFileSync(file, 'utf8')
    switch (extname(file)) {
      case '.json':
        t.doesNotThrow(() => JSON.parse(text), `${m.host} is JSON`)
        break
      case '.yml':
      case '.yaml':
        t.doesNotThrow(() => parseYaml(text, { uniqueKeys: true }), `${m.host} is YAML`)
        break
      case '.mjs':
      case '.js': {
        const r = spawnSync(process.execPath, ['--check', file], { encoding: 'utf8' })
        t.equal(r.status, 0, `${m.host} is valid JavaScript ${r.stderr}`)
        break
      }
      default:
        t.fail(`${m.host}: no parser for ${extname(file)}`)
    }
  }
  const byContainer = new Map(mounts.map((m) => [m.container, m.host]))
  t.equal(byContainer.get('/opt/keycloak/data/import/flappyjournal-realm.json'), './config/keycloak/flappyjournal-realm.json', 'realm imported')
  t.equal(byContainer.get('/etc/prometheus/prometheus.yml'), './deploy/prometheus/prometheus.yml')
  t.equal(byContainer.get('/etc/prometheus/alerts.yml'), './deploy/prometheus/alerts.yml')
  t.equal(byContainer.get('/var/lib/grafana/dashboards/resonance-gateway.json'), './deploy/grafana/dashboards/resonance-gateway.json')
})

// ---------------------------------------------------------------------------------------------------------------
// Keycloak realm
// ---------------------------------------------------------------------------------------------------------------

t.test('Keycloak realm: client with audience mapper, premium role, two demo users', async (t) => {
  const realm = JSON.parse(readFileSync(REALM_FILE, 'utf8')) as Any
  t.equal(realm.realm, 'flappyjournal')
  t.ok(realm.enabled)
  t.match(realm.displayName, /demo/i, 'labelled as a demo realm')
  t.ok((realm.roles.realm as Any[]).some((r) => r.name === 'premium'), 'realm role premium')

  const client = (realm.clients as Any[]).find((c) => c.clientId === 'resonance-gateway')
  t.ok(client, 'client resonance-gateway')
  t.equal(client.publicClient, false, 'confidential')
  t.equal(client.serviceAccountsEnabled, true)
  t.equal(client.directAccessGrantsEnabled, true)
  t.match(client.secret, /^demo-only-/, 'the client secret says it is demo-only')
  const mapper = (client.protocolMappers as Any[]).find((m) => m.protocolMapper === 'oidc-audience-mapper')
  t.ok(mapper, 'audience mapper')
  t.equal(mapper.config['included.client.audience'], 'resonance-gateway', 'tokens carry the gateway\'s audience')
  t.equal(mapper.config['access.token.claim'], 'true')
  t.match(services.gateway.environment.JWT_AUDIENCE, /^\$\{JWT_AUDIENCE:-resonance-gateway\}$/, 'the gateway expects that audience')

  const users = new Map((realm.users as Any[]).map((u) => [u.username, u]))
  for (const name of ['alice', 'bob']) {
    const u = users.get(name)
    t.ok(u?.enabled, `${name} exists and is enabled`)
    t.ok(u?.email && u?.firstName && u?.lastName, `${name} has a complete profile (no "account not fully set up")`)
    const pw = (u?.credentials as Any[] | undefined)?.find((c) => c.type === 'password')
    t.match(pw?.value, /demo/, `${name}'s password says it is a demo password`)
    t.equal(pw?.temporary, false)
  }
  t.ok(users.get('alice').realmRoles.includes('premium'), 'alice is premium')
  t.notOk(users.get('bob').realmRoles.includes('premium'), 'bob is not')
  t.equal(users.get('service-account-resonance-gateway')?.serviceAccountClientId, 'resonance-gateway', 'service account user')
})

// ---------------------------------------------------------------------------------------------------------------
// Grafana
// ---------------------------------------------------------------------------------------------------------------

t.test('Grafana dashboard: parses; every expr uses existing metrics and labels; the required views exist', async (t) => {
  const dash = JSON.parse(readFileSync(DASHBOARD_FILE, 'utf8')) as Any
  const datasource = readYaml(DATASOURCE_FILE)
  const dsUid = datasource.datasources[0].uid as string
  t.equal(datasource.datasources[0].url, 'http://prometheus:9090', 'datasource is the compose Prometheus')
  t.ok(dash.uid && dash.title, 'uid and title')
  const exprs: string[] = []
  const seen = new Set<string>()
  for (const panel of dash.panels as Any[]) {
    if (panel.type === 'row') continue
    t.equal(panel.datasource?.uid, dsUid, `${panel.title}: provisioned datasource`)
    t.ok((panel.targets as Any[]).length > 0, `${panel.title}: has queries`)
    for (const target of panel.targets as Any[]) {
      const { metrics, problems } = checkExpr(target.expr)
      t.same(problems, [], `${panel.title}: ${target.expr}`)
      metrics.forEach((m) => seen.add(m))
      exprs.push(target.expr)
    }
  }
  const ids = (dash.panels as Any[]).map((p) => p.id)
  t.equal(new Set(ids).size, ids.length, 'panel ids are unique')
  for (const m of ['resonance_http_requests_total', 'resonance_http_request_duration_seconds', 'resonance_auth_failures_total',
    'resonance_rate_limit_triggered_total', 'resonance_ws_connections', 'resonance_jwks_fetches_total', 'resonance_rate_limit_store_errors_total',
    'resonance_upstream_errors_total', 'resonance_connections_open', 'resonance_connections_refused_total']) {
    t.ok(seen.has(m), `the dashboard shows ${m}`)
  }
  const all = exprs.join('\n')
  t.match(all, /by \(le, status_class\) \(rate\(resonance_http_request_duration_seconds_bucket/, 'latency by status class')
  t.match(all, /by \(reason\) \(rate\(resonance_auth_failures_total/, 'auth failures by reason')
  t.match(all, /by \(transport\) \(rate\(resonance_rate_limit_triggered_total/, '429s by transport')
  t.match(all, /by \(reason\) \(rate\(resonance_connections_refused_total/, 'refused connections by reason')
  t.match(all, /by \(instance\) \(resonance_connections_open/, 'open connections per gateway')

  if (PROMTOOL !== undefined) {
    // promtool has no "check expression": every query becomes a recording rule, with Grafana's variables filled in.
    const dir = mkdtempSync(join(tmpdir(), 'dash-promql-'))
    t.teardown(() => rmSync(dir, { recursive: true, force: true }))
    const rules = exprs.map((e, i) => ({ record: `dashboard:query_${i}`, expr: e.replaceAll('$__rate_interval', '1m').replaceAll('$instance', '.*') }))
    writeFileSync(join(dir, 'rules.yml'), JSON.stringify({ groups: [{ name: 'dashboard', rules }] }))
    const r = spawnSync(PROMTOOL, ['check', 'rules', join(dir, 'rules.yml')], { encoding: 'utf8' })
    t.equal(r.status, 0, `every dashboard query is valid PromQL (promtool): ${r.stdout}${r.stderr}`)
  }
})

t.test('Grafana provisioning points at the mounted dashboards', async (t) => {
  const providers = readYaml(join(ROOT, 'deploy', 'grafana', 'provisioning', 'dashboards', 'resonance.yml'))
  const path = providers.providers[0].options.path as string
  t.ok(mounts.some((m) => m.service === 'grafana' && posix.dirname(m.container) === path && m.host.endsWith('.json')), `a dashboard is mounted under ${path}`)
})

// ---------------------------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------------------------

t.test('alert rules: structure, existing metrics, the required alerts', async (t) => {
  const doc = readYaml(ALERTS_FILE)
  const rules = (doc.groups as Any[]).flatMap((g) => g.rules as Any[])
  const byMetric = new Map<string, string[]>()
  for (const r of rules) {
    t.match(r.alert, /^[A-Z][A-Za-z0-9]+$/, 'alert name')
    t.match(r.labels?.severity, /^(warning|critical)$/, `${r.alert}: severity`)
    t.ok(r.annotations?.summary && r.annotations?.description, `${r.alert}: summary and description`)
    t.match(r.for, /^\d+[smh]$/, `${r.alert}: a for: duration`)
    const { metrics, problems } = checkExpr(r.expr)
    t.same(problems, [], `${r.alert}: ${r.expr}`)
    for (const m of metrics) byMetric.set(m, [...(byMetric.get(m) ?? []), r.alert])
  }
  t.ok(byMetric.has('resonance_auth_failures_total'), 'auth-failure spike')
  t.ok(byMetric.has('resonance_rate_limit_store_errors_total'), 'Redis store errors')
  t.ok(byMetric.has('resonance_jwks_fetches_total'), 'JWKS fetch failures')
  t.ok(byMetric.has('resonance_upstream_errors_total'), 'upstream errors')
  t.ok(byMetric.has('resonance_connections_refused_total'), 'refused connections')
  t.ok(byMetric.has('resonance_connections_open'), 'open connections')
  const byName = new Map(rules.map((r) => [r.alert as string, r]))
  t.match(byName.get('ResonanceGatewayAbsent')?.expr, /^absent\(up\{job="resonance-gateway"\}\)$/, 'vanished targets alert too')
  t.match(readFileSync(ALERTS_FILE, 'utf8'), /job="resonance-gateway"[\s\S]*relabel|relabel[\s\S]*job="resonance-gateway"/, 'the job label is documented with a relabel example')
  t.notMatch(byName.get('ResonanceNoSigningKeys')?.expr, /\bmax\s*\(/, 'no signing keys: per gateway, not the best replica')
  for (const [, m] of (byName.get('ResonanceConnectionCapReached')?.expr ?? '').matchAll(/reason="(\w+)"/g)) t.equal(m, 'global')
  t.match(byName.get('ResonancePerIpConnectionsRefused')?.expr, /reason="per_ip"/)

  // Every alert has a promtool case that expects it to fire (exp_alerts non-empty), so every rule's expression and
  // annotations are exercised (promtool runs them when installed).
  const cases = (readYaml(ALERT_TESTS_FILE).tests as Any[]).flatMap((tc) => tc.alert_rule_test as Any[])
  for (const name of byName.keys()) {
    t.ok(cases.some((c) => c.alertname === name && (c.exp_alerts as Any[]).length > 0), `alerts.test.yml has a firing case for ${name}`)
  }
})

t.test('Prometheus config: scrapes the gateway\'s admin port, loads the mounted rules', async (t) => {
  const prom = readYaml(PROMETHEUS_FILE)
  const job = (prom.scrape_configs as Any[]).find((j) => j.job_name === 'resonance-gateway')
  t.same(job.static_configs[0].targets, ['gateway:9090'], 'the compose service gateway, admin port 9090 (the image\'s ADMIN_PORT)')
  t.match(readFileSync(DOCKERFILE, 'utf8'), /ADMIN_PORT=9090/)
  t.equal(job.metrics_path ?? '/metrics', '/metrics')
  for (const f of prom.rule_files as string[]) {
    t.ok(existsSync(join(dirname(PROMETHEUS_FILE), f)), `rule file ${f} exists next to prometheus.yml`)
    t.ok(mounts.some((m) => m.service === 'prometheus' && m.container === posix.join('/etc/prometheus', f)), `${f} is mounted next to the config`)
  }
})

t.test('promtool: check config, check rules, rule unit tests', { skip: PROMTOOL === undefined ? 'promtool is not installed (Debian package prometheus): the rules were only parsed' : false }, async (t) => {
  for (const args of [['check', 'config', PROMETHEUS_FILE], ['check', 'rules', ALERTS_FILE], ['test', 'rules', ALERT_TESTS_FILE]]) {
    const r = spawnSync(PROMTOOL as string, args, { cwd: dirname(ALERTS_FILE), encoding: 'utf8' })
    t.equal(r.status, 0, `promtool ${args.slice(0, 2).join(' ')}: ${r.stdout}${r.stderr}`)
  }
})

// ---------------------------------------------------------------------------------------------------------------
// Kubernetes sidecar example
// ---------------------------------------------------------------------------------------------------------------

t.test('Kubernetes manifests: kinds, sidecar, probes, scrape annotations; the ConfigMap passes the gateway\'s validation', async (t) => {
  const files = readdirSync(K8S_DIR).filter((f) => f.endsWith('.yaml'))
  const objects: Any[] = []
  for (const f of files) {
    for (const doc of parseAllDocuments(readFileSync(join(K8S_DIR, f), 'utf8'), { uniqueKeys: true })) {
      t.same(doc.errors, [], `${f} parses`)
      const o = doc.toJS() as Any
      if (o === null) continue
      t.ok(o.apiVersion && o.kind, `${f}: apiVersion and kind`)
      objects.push(o)
    }
  }
  const kinds = (k: string): Any[] => objects.filter((o) => o.kind === k)
  for (const k of ['Deployment', 'ConfigMap', 'Secret', 'Service']) t.equal(kinds(k).length, 1, `one ${k}`)
  const kustomization = kinds('Kustomization')[0]
  if (kustomization !== undefined) {
    for (const r of kustomization.resources as string[]) t.ok(existsSync(join(K8S_DIR, r)), `kustomization resource ${r} exists`)
  }

  const deployment = kinds('Deployment')[0]
  const pod = deployment.spec.template
  t.same(deployment.spec.selector.matchLabels, Object.fromEntries(Object.entries(pod.metadata.labels).filter(([k]) => k in deployment.spec.selector.matchLabels)), 'selector matches the pod labels')
  const containers = new Map((pod.spec.containers as Any[]).map((c) => [c.name, c]))
  t.same([...containers.keys()].sort(), ['app', 'gateway'], 'app + gateway sidecar')
  const gw = containers.get('gateway')
  const portOf = (ref: string | number): number => typeof ref === 'number' ? ref : (gw.ports as Any[]).find((p) => p.name === ref)?.containerPort
  t.equal(gw.livenessProbe.httpGet.path, '/healthz', 'liveness on /healthz')
  t.equal(gw.readinessProbe.httpGet.path, '/readyz', 'readiness on /readyz')
  t.equal(portOf(gw.livenessProbe.httpGet.port), 9090, 'probes on the admin port')
  t.equal(portOf(gw.readinessProbe.httpGet.port), 9090)
  const ann = pod.metadata.annotations
  t.equal(ann['prometheus.io/scrape'], 'true', 'scrape annotation')
  t.equal(ann['prometheus.io/port'], '9090', 'scraped on the admin port')
  t.equal(ann['prometheus.io/path'], '/metrics')
  t.equal(gw.securityContext.runAsNonRoot ?? pod.spec.securityContext.runAsNonRoot, true, 'non-root')
  t.ok(Number.isInteger(gw.securityContext.runAsUser) && gw.securityContext.runAsUser > 0, 'numeric non-root uid (the image says USER node)')

  const service = kinds('Service')[0]
  t.same(service.spec.selector, deployment.spec.selector.matchLabels, 'the Service selects the pods')
  t.equal(service.spec.ports.length, 1, 'only one port exposed')
  t.equal(portOf(service.spec.ports[0].targetPort), 8080, 'the Service points at the gateway, not the app')
  t.notOk((containers.get('app').ports as Any[]).some((p) => p.containerPort === portOf(service.spec.ports[0].targetPort)))

  // The gateway's configuration as the pod assembles it: ConfigMap file + Secret env + container env.
  const configMap = kinds('ConfigMap')[0]
  const secret = kinds('Secret')[0]
  t.equal(gw.envFrom[0].secretRef.name, secret.metadata.name, 'the Secret feeds the gateway\'s env')
  const volume = (pod.spec.volumes as Any[]).find((v) => v.configMap?.name === configMap.metadata.name)
  const mount = (gw.volumeMounts as Any[]).find((m) => m.name === volume?.name)
  const env: Record<string, string> = { ...secret.stringData }
  for (const e of gw.env as Any[]) env[e.name] = e.value
  t.ok(mount !== undefined && env.CONFIG_FILE === posix.join(mount.mountPath, 'gateway.yaml'), 'CONFIG_FILE is the mounted ConfigMap key')
  const dir = mkdtempSync(join(tmpdir(), 'k8s-config-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const file = join(dir, 'gateway.yaml')
  writeFileSync(file, configMap.data['gateway.yaml'])
  const config = loadConfig({ file, env: { ...env, CONFIG_FILE: file } })
  t.equal(config.upstream.url, 'http://127.0.0.1:3000', 'the gateway forwards to the app in the same pod')
  t.equal(config.admin.host, '0.0.0.0', 'the admin port is reachable by the kubelet and Prometheus')
  t.equal(config.admin.port, 9090)
  t.equal(config.server.port, portOf('http'))
  t.equal(config.server.allowInsecureHttp, false, 'no plaintext tokens in the cluster example')
  t.ok(config.redis.url !== undefined && config.admin.token !== undefined, 'REDIS_URL and ADMIN_TOKEN from the Secret')
  t.ok(pod.spec.terminationGracePeriodSeconds * 1000 > config.server.shutdownDelayMs + config.server.shutdownTimeoutMs, 'the grace period covers the gateway\'s drain')
})

// ---------------------------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------------------------

/** Whether a version satisfies an npm `engines` range made of `||` alternatives of space-separated >=, >, <=, <, = comparators. */
function satisfies (version: string, range: string): boolean {
  const v = version.split('.').map(Number)
  const cmp = (b: string): number => {
    const w = b.split('.').map(Number)
    for (let i = 0; i < 3; i++) if ((v[i] ?? 0) !== (w[i] ?? 0)) return (v[i] ?? 0) < (w[i] ?? 0) ? -1 : 1
    return 0
  }
  return range.split('||').some((alt) => alt.trim().split(/\s+/).every((c) => {
    const m = /^(>=|<=|>|<|=)?(\d+(?:\.\d+){0,2})$/.exec(c)
    if (m === null) throw new Error(`unsupported comparator ${c} in ${range}`)
    const r = cmp(m[2] as string)
    switch (m[1]) {
      case '>=': return r >= 0
      case '>': return r > 0
      case '<=': return r <= 0
      case '<': return r < 0
      default: return r === 0
    }
  }))
}

t.test('the engines check itself', async (t) => {
  t.ok(satisfies('24.22.3', '>=22'))
  t.notOk(satisfies('20.20.2', '>=22'))
  t.ok(satisfies('20.19.0', '>=20.19 <25'))
  t.notOk(satisfies('25.0.0', '>=20.19 <25'))
  t.ok(satisfies('22.1.0', '20 || >=22'))
})

t.test('Node: every image on the same pinned Node 24 release; engines holds for it; .ci/run tests that release', async (t) => {
  const nodeImage = (file: string): string | undefined => /^ARG NODE_IMAGE=(\S+)$/m.exec(readFileSync(file, 'utf8'))?.[1]
  const gateway = nodeImage(DOCKERFILE) as string
  const m = /^node:(24\.\d+\.\d+)-bookworm-slim$/.exec(gateway)
  t.ok(m !== null, `the gateway image is node 24 (Active LTS), a pinned release on Debian bookworm slim (${gateway})`)
  const version = m?.[1] as string
  t.equal(nodeImage(join(STANDIN_DIR, 'Dockerfile')), gateway, 'the stand-in app uses the same base image')
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as Any
  t.ok(satisfies(version, pkg.engines.node), `engines.node ${pkg.engines.node} holds for the image's Node ${version}`)
  // Node 20 reached end of life on 2026-04-30; the production tree (cookie, via fastify's light-my-request) needs 22.
  t.notOk(satisfies('20.20.2', pkg.engines.node), 'engines does not claim the end-of-life Node 20')
  const rootLock = JSON.parse(readFileSync(join(ROOT, 'package-lock.json'), 'utf8')) as Any
  for (const [path, p] of Object.entries(rootLock.packages as Record<string, Any>)) {
    if (path === '' || p.dev === true || typeof p.engines?.node !== 'string') continue
    let ok: boolean
    try { ok = satisfies(version, p.engines.node.replace(/\^(\d+)(\.\d+)*/g, '>=$1$2')) } catch { continue }
    if (!ok) t.fail(`${path} (engines ${p.engines.node}) does not support Node ${version}`)
  }
  t.equal(rootLock.packages[''].engines?.node, pkg.engines.node, 'package-lock.json carries the same engines')
  // .ci/run reads the version from the Dockerfile with this sed expression and fetches that exact release.
  const ci = readFileSync(join(ROOT, '.ci', 'run'), 'utf8')
  const sed = /image_node=\$\(sed -nE '([^']+)' Dockerfile/.exec(ci)?.[1]
  t.ok(sed !== undefined, '.ci/run takes the Node version from the Dockerfile')
  const r = spawnSync('sed', ['-nE', sed as string, DOCKERFILE], { encoding: 'utf8' })
  t.equal(r.stdout.trim(), version, '.ci/run\'s second run uses exactly the image\'s Node')
})

t.test('Dockerfile: multi-stage, pinned node 24 slim, non-root, init, healthcheck on the admin port', async (t) => {
  const text = readFileSync(DOCKERFILE, 'utf8')
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '' && !l.startsWith('#'))
  const froms = lines.filter((l) => /^FROM\s/i.test(l))
  t.ok(froms.length >= 2, 'multi-stage')
  const args = new Map([...text.matchAll(/^ARG\s+(\w+)=(\S+)/gm)].map((m) => [m[1] as string, m[2] as string]))
  for (const from of froms) {
    const image = (from.split(/\s+/)[1] as string).replace(/^\$\{(\w+)\}$/, (_m, name: string) => args.get(name) ?? '')
    t.match(image, /^node:24\.\d+\.\d+-[a-z]+-slim$|^node:24\.\d+\.\d+-slim$/, `base image pinned to a node 24 slim release (${image})`)
  }
  const user = lines.filter((l) => /^USER\s/i.test(l)).at(-1)
  t.ok(user !== undefined && !/^USER\s+(root|0)(:|$)/i.test(user), `runs as a non-root user (${String(user)})`)
  t.match(text, /^ENTRYPOINT\s+\["\/usr\/bin\/tini",\s*"--"\]/m, 'tini as PID 1')
  t.match(text, /^HEALTHCHECK\s[\s\S]*?(ADMIN_PORT|9090)[\s\S]*?\/healthz/m, 'healthcheck on the admin port')
  t.match(text, /^EXPOSE\s+8080\s+9090\s*$/m, 'EXPOSE 8080 9090')
  t.match(text, /^CMD\s+\["node",\s*"dist\/server\.js"\]\s*$/m, 'CMD runs node directly (exec form, no npm)')
})
