// Set-up shared by bench/run.mjs and bench/auth-flood.mjs: the copy of dist/
// every gateway starts from, the environment the children get, the signing
// key and tokens, the issuer and app stand-ins, and the env every gateway shares.
import { cpSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import path from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { randomUUID } from 'node:crypto'
import { SignJWT, calculateJwkThumbprint, exportJWK, exportSPKI, generateKeyPair } from 'jose'
import { spawnNode, waitHello } from './children.mjs'

export const BENCH_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..')
export const ROOT = path.resolve(BENCH_DIR, '..')
/** The gateway build under test: this checkout's dist/, or BENCH_DIST (e.g. an older build, for before/after figures). */
export const DIST = process.env.BENCH_DIST ? path.resolve(process.env.BENCH_DIST) : path.join(ROOT, 'dist')
/**
 * Every gateway of a run starts from a copy of dist/ taken when the run
 * starts (inside bench/, so node_modules still resolves): other work that
 * rebuilds dist/ mid-run cannot mix two builds into one set of tables.
 */
const SNAPSHOT_PREFIX = '.dist-snapshot-'
const SNAPSHOT = path.join(BENCH_DIR, `${SNAPSHOT_PREFIX}${process.pid}`)
export const GATEWAY_ENTRY = path.join(SNAPSHOT, 'server.js')
export const APP_SCRIPT = path.join(BENCH_DIR, 'subjects/app.mjs')
export const ISSUER_SCRIPT = path.join(BENCH_DIR, 'subjects/issuer.mjs')
export const REALM = 'bench'
export const AUDIENCE = 'resonance-gateway'
export const CLIENT_ID = 'resonance-web'
export const REQUEST_PATH = '/api/resonance/items/'

// ----------------------------------------------------------------- dist --

function gitDescribe () {
  try {
    const head = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT, encoding: 'utf8' }).trim()
    const dirty = execFileSync('git', ['status', '--porcelain', '--', 'src'], { cwd: ROOT, encoding: 'utf8' }).trim()
    return dirty ? `${head} + uncommitted changes in src/ (${dirty.split('\n').length} files)` : head
  } catch {
    return 'unknown'
  }
}

/**
 * Copies dist/ to SNAPSHOT (removed on exit; stale copies of dead runs are removed here).
 * Returns what was copied: `git` (commit, or BENCH_DIST) and `at` (dist/server.js's mtime).
 */
export function snapshotDist () {
  for (const name of readdirSync(BENCH_DIR)) {
    if (!name.startsWith(SNAPSHOT_PREFIX)) continue
    const pid = Number(name.slice(SNAPSHOT_PREFIX.length))
    let alive = false
    try { process.kill(pid, 0); alive = true } catch (err) { alive = err.code === 'EPERM' }
    if (!alive) rmSync(path.join(BENCH_DIR, name), { recursive: true, force: true })
  }
  const git = process.env.BENCH_DIST ? `BENCH_DIST=${DIST}` : gitDescribe()
  const at = statSync(path.join(DIST, 'server.js')).mtime.toISOString()
  cpSync(DIST, SNAPSHOT, { recursive: true, filter: (src) => !src.endsWith('.map') })
  process.on('exit', () => rmSync(SNAPSHOT, { recursive: true, force: true }))
  return { git, at }
}

/**
 * The children's environment: the caller's, without any of the gateway's
 * settings (a stray REDIS_URL or JWKS_URL would silently change what is
 * measured), CONFIG_FILE or NODE_OPTIONS. Also writes `tmp`/empty.yaml, the
 * CONFIG_FILE of every gateway. Call after snapshotDist().
 */
export async function childEnv (tmp) {
  const { LEAVES } = await import(pathToFileURL(path.join(SNAPSHOT, 'config/settings.js')).href)
  const cleanEnv = { ...process.env }
  for (const leaf of Object.values(LEAVES)) delete cleanEnv[leaf.env]
  delete cleanEnv.CONFIG_FILE
  delete cleanEnv.NODE_OPTIONS
  const emptyConfig = path.join(tmp, 'empty.yaml')
  writeFileSync(emptyConfig, '# intentionally empty: every setting comes from the environment\n')
  return { cleanEnv, emptyConfig }
}

// --------------------------------------------------------------- tokens --

export async function makeKey () {
  const { publicKey, privateKey } = await generateKeyPair('RS256', { modulusLength: 2048 })
  const jwk = await exportJWK(publicKey)
  jwk.kid = await calculateJwkThumbprint(jwk)
  jwk.alg = 'RS256'
  jwk.use = 'sig'
  return { privateKey, jwk, publicKeyPem: await exportSPKI(publicKey) }
}

/** N distinct Keycloak-like access tokens (distinct subs), valid for an hour: [{ sub, jwt }]. `extraRoles` join the realm roles. */
export async function signTokens (key, issuer, n, { extraRoles = [] } = {}) {
  const now = Math.floor(Date.now() / 1000)
  const tokens = []
  for (let i = 0; i < n; i++) {
    const sub = randomUUID()
    tokens.push(new SignJWT({
      azp: CLIENT_ID,
      typ: 'Bearer',
      scope: 'openid profile email',
      sid: randomUUID(),
      preferred_username: `bench-user-${i}`,
      email_verified: true,
      realm_access: { roles: ['default-roles-bench', 'offline_access', 'user', ...extraRoles] },
      resource_access: { account: { roles: ['view-profile'] } }
    })
      .setProtectedHeader({ alg: 'RS256', typ: 'JWT', kid: key.jwk.kid })
      .setIssuer(issuer)
      .setAudience(AUDIENCE)
      .setSubject(sub)
      .setIssuedAt(now)
      .setExpirationTime(now + 3600)
      .setJti(randomUUID())
      .sign(key.privateKey)
      .then((jwt) => ({ sub, jwt })))
  }
  return Promise.all(tokens)
}

// ------------------------------------------------------------ processes --

/**
 * The issuer (serving `key`'s JWKS) and the app stand-in, started together on
 * the subject core. Returns their children and ctx.issuer / ctx.app.
 */
export async function startIssuerAndApp (key, { cleanEnv, pin }) {
  const issuerChild = spawnNode('issuer', ISSUER_SCRIPT, {
    cwd: ROOT, pin, env: { ...cleanEnv, BENCH_REALM: REALM, BENCH_JWKS: JSON.stringify({ keys: [key.jwk] }) }
  })
  const appChild = spawnNode('app', APP_SCRIPT, { cwd: ROOT, pin, env: cleanEnv })
  const [issuerHello, appHello] = await Promise.all([waitHello(issuerChild), waitHello(appChild)])
  return {
    issuerChild,
    appChild,
    issuer: { issuer: issuerHello.issuer, url: `http://127.0.0.1:${issuerHello.port}`, pid: issuerChild.pid },
    app: { url: `http://127.0.0.1:${appHello.port}`, pid: appChild.pid, child: appChild }
  }
}

/** The environment every gateway variant shares; variants add or override keys. */
export function gatewayEnv (ctx, ports, upstream) {
  return {
    ...ctx.cleanEnv,
    JWT_ISSUER: ctx.issuer.issuer,
    JWT_AUDIENCE: AUDIENCE,
    ALLOW_INSECURE_HTTP: 'true',
    LOG_LEVEL: 'warn',
    CONFIG_FILE: ctx.emptyConfig,
    HOST: '127.0.0.1',
    PORT: String(ports.port),
    ADMIN_HOST: '127.0.0.1',
    ADMIN_PORT: String(ports.adminPort),
    UPSTREAM_URL: upstream,
    // 1000 users at thousands of req/s would exceed any realistic per-user
    // limit; the bench measures the limiter's cost, never its 429s.
    RATE_LIMIT_MAX: '1000000000',
    SHUTDOWN_DELAY: '0'
  }
}

/** --cpu-prof arguments when `dir` (BENCH_PROFILE) names a folder (the profile is written when the process exits). */
export function profileArgv (dir, name) {
  if (!dir) return []
  mkdirSync(dir, { recursive: true })
  return ['--cpu-prof', `--cpu-prof-dir=${dir}`, `--cpu-prof-name=${name}.cpuprofile`]
}
