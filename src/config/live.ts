/**
 * The configuration in force, replaceable at runtime (SIGHUP, or a file watch
 * with CONFIG_WATCH=true). Only the parts that shape request policy reload:
 * public paths, role rules, rate limits (budgets, routes, roles, exemptions,
 * auth-failure limit), WebSocket limits and the log level. Listeners (their
 * timeouts and connection caps included), TLS, issuer/JWKS, upstream and Redis
 * need a restart: a reload that changes them
 * keeps the old values and says so. Requests read `live.current` when they
 * start, so a reload applies to new requests and leaves open connections be.
 */
import { watch, type FSWatcher } from 'node:fs'
import type { FastifyBaseLogger } from 'fastify'
import { loadConfig, type Config } from './load.js'

export interface ReloadResult { ok: boolean, error?: string, restartNeeded: string[] }

/** Top-level sections (or leaves) that cannot change without a restart. */
const FIXED: Array<[string, (c: Config) => unknown]> = [
  ['server', (c) => c.server],
  ['admin', (c) => c.admin],
  ['upstream', (c) => c.upstream],
  ['redis', (c) => c.redis],
  ['auth.issuer', (c) => c.auth.issuer],
  ['auth.audience', (c) => c.auth.audiences],
  ['auth.acceptAzpAsAudience', (c) => c.auth.acceptAzpAsAudience],
  ['auth.jwksUrl', (c) => c.auth.jwksUrl],
  ['auth.jwks', (c) => c.auth.jwks],
  ['auth.algorithms', (c) => c.auth.algorithms],
  ['auth.clockTolerance', (c) => c.auth.clockToleranceSec],
  ['auth.roleClients', (c) => c.auth.roleClients],
  ['auth.verifyCacheSize', (c) => c.auth.verifyCacheSize],
  ['rateLimit.keyPrefix', (c) => c.rateLimit.keyPrefix],
  ['rateLimit.onStoreError', (c) => c.rateLimit.onStoreError],
  ['ws.maxPayload', (c) => c.ws.maxPayload],
  ['ws.pingInterval', (c) => c.ws.pingIntervalMs],
  ['ws.idleTimeout', (c) => c.ws.idleTimeoutMs]
]

function same (a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b)
}

export class LiveConfig {
  private config: Config
  private watcher: FSWatcher | undefined
  private readonly listeners: Array<(c: Config) => void> = []

  constructor (initial: Config, private readonly env: NodeJS.ProcessEnv = process.env) {
    this.config = initial
  }

  get current (): Config { return this.config }

  onChange (listener: (c: Config) => void): void { this.listeners.push(listener) }

  /** Re-reads file + env; on any error the configuration in force stays. */
  reload (log: FastifyBaseLogger): ReloadResult {
    let next: Config
    try {
      next = loadConfig({ env: this.env, file: this.config.source })
    } catch (err) {
      const error = (err as Error).message
      log.error({ component: 'config', error }, 'config reload rejected: keeping the configuration in force')
      return { ok: false, error, restartNeeded: [] }
    }
    const restartNeeded = FIXED.filter(([, get]) => !same(get(this.config), get(next))).map(([name]) => name)
    const merged: Config = Object.freeze({
      ...next,
      source: this.config.source,
      server: this.config.server,
      admin: this.config.admin,
      upstream: this.config.upstream,
      redis: this.config.redis,
      auth: Object.freeze({
        ...this.config.auth,
        publicPaths: next.auth.publicPaths,
        isPublic: next.auth.isPublic,
        routes: next.auth.routes,
        revocationMinTtlMs: next.auth.revocationMinTtlMs
      }),
      rateLimit: Object.freeze({ ...next.rateLimit, keyPrefix: this.config.rateLimit.keyPrefix, onStoreError: this.config.rateLimit.onStoreError }),
      ws: Object.freeze({
        ...next.ws,
        maxPayload: this.config.ws.maxPayload,
        pingIntervalMs: this.config.ws.pingIntervalMs,
        idleTimeoutMs: this.config.ws.idleTimeoutMs
      })
    })
    this.config = merged
    if (restartNeeded.length > 0) {
      log.warn({ component: 'config', restartNeeded }, 'config reloaded; these settings need a restart and keep their old values')
    } else {
      log.info({ component: 'config' }, 'config reloaded')
    }
    for (const l of this.listeners) l(merged)
    return { ok: true, restartNeeded }
  }

  /** Reloads when the YAML file changes (debounced); for CONFIG_WATCH=true. */
  watch (log: FastifyBaseLogger): void {
    const file = this.config.source
    if (file === undefined || this.watcher !== undefined) return
    let timer: NodeJS.Timeout | undefined
    // Watch the directory: editors and ConfigMap updates replace the file (rename), which a file watch would miss.
    const dir = file.includes('/') ? file.slice(0, file.lastIndexOf('/')) || '/' : '.'
    const name = file.slice(file.lastIndexOf('/') + 1)
    this.watcher = watch(dir, (_event, changed) => {
      if (changed !== null && changed !== name && !String(changed).startsWith('..')) return
      clearTimeout(timer)
      timer = setTimeout(() => { this.reload(log) }, 200)
    })
    this.watcher.on('error', (err) => log.error({ component: 'config', err: { message: err.message } }, 'config watch failed'))
  }

  close (): void {
    this.watcher?.close()
  }
}
