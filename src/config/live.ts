/**
 * The configuration in force, replaceable at runtime (SIGHUP, or a file watch
 * with CONFIG_WATCH=true). Which settings apply on a reload is decided in one
 * place, the `reload` field of each setting in settings.ts: `live` ones (and
 * the YAML-only rule lists: public paths, role rules, route limits, role
 * budgets, exemptions) apply to new requests; `restart` ones keep the value the
 * process started with, and the reload names those that changed. Requests read
 * `live.current` when they start, so a reload applies to new requests and
 * leaves open connections be.
 */
import { watch, type FSWatcher } from 'node:fs'
import type { FastifyBaseLogger } from 'fastify'
import { loadConfig, type Config } from './load.js'
import { LEAVES, type LeafPath, type LeafValues } from './settings.js'

export interface ReloadResult { ok: boolean, error?: string, restartNeeded: string[] }

/** Settings a reload must not change (settings.ts: reload 'restart'). */
export const RESTART_ONLY = (Object.keys(LEAVES) as LeafPath[]).filter((p) => LEAVES[p].reload === 'restart')
/** Settings a reload applies. */
export const LIVE_SETTINGS = (Object.keys(LEAVES) as LeafPath[]).filter((p) => LEAVES[p].reload === 'live')

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
    let restartNeeded: string[]
    try {
      next = loadConfig({ env: this.env, file: this.config.source })
      // Restart-only settings that changed keep the value in force: loaded again with those pinned.
      restartNeeded = RESTART_ONLY.filter((p) => !same(next.leaves[p], this.config.leaves[p]))
      if (restartNeeded.length > 0) next = loadConfig({ env: this.env, file: this.config.source, keep: this.restartOnlyValues() })
    } catch (err) {
      const error = (err as Error).message
      log.error({ component: 'config', error }, 'config reload rejected: keeping the configuration in force')
      return { ok: false, error, restartNeeded: [] }
    }
    this.config = next
    if (restartNeeded.length > 0) {
      log.warn({ component: 'config', restartNeeded }, 'config reloaded; these settings need a restart and keep their old values')
    } else {
      log.info({ component: 'config' }, 'config reloaded')
    }
    for (const l of this.listeners) l(next)
    return { ok: true, restartNeeded }
  }

  private restartOnlyValues (): Partial<LeafValues> {
    const keep: Record<string, unknown> = {}
    for (const p of RESTART_ONLY) keep[p] = this.config.leaves[p]
    return keep as Partial<LeafValues>
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
