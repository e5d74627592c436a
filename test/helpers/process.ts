// The gateway as the container runs it: `node dist/server.js` (or src/server.ts through tap's TypeScript loader) as a
// child process, in a clean environment (nothing from the test runner, e.g. NODE_OPTIONS loaders or coverage, nor from
// the developer's shell), its output captured, killed when the test ends.
import { execFileSync, spawn, type ChildProcessWithoutNullStreams } from 'node:child_process'
import { existsSync, readdirSync, statSync } from 'node:fs'
import { join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'
import { writeYaml } from './gateway.js'
import { freePort } from './ports.js'

export const ROOT = fileURLToPath(new URL('../..', import.meta.url))
export const ENTRY = join(ROOT, 'dist', 'server.js')
const LOOPBACK = '127.0.0.1'

/**
 * dist/ is stale when it lacks the compiled .js of some src/**\/*.ts, or that is older (src is edited while tests run).
 * Declaration files (.d.ts) compile to nothing.
 */
export function distStale (): boolean {
  const src = join(ROOT, 'src')
  const compiled = (name: string): boolean => name.endsWith('.ts') && !name.endsWith('.d.ts')
  const walk = (dir: string): string[] => readdirSync(dir, { withFileTypes: true })
    .flatMap((e) => e.isDirectory() ? walk(join(dir, e.name)) : compiled(e.name) ? [join(dir, e.name)] : [])
  return walk(src).some((file) => {
    const out = join(ROOT, 'dist', relative(src, file).replace(/\.ts$/, '.js'))
    return !existsSync(out) || statSync(out).mtimeMs < statSync(file).mtimeMs
  })
}

/**
 * Builds dist/ when it is stale. tsc emits even with type errors elsewhere in the tree (another engineer's edit in
 * progress), so a failing build is not fatal as long as the entrypoint exists.
 */
export function ensureBuilt (): void {
  if (!distStale()) return
  try {
    execFileSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'ignore' })
  } catch {
    // judged by the entrypoint below
  }
  if (!existsSync(ENTRY)) throw new Error(`${ENTRY} could not be built (npm run build)`)
}

export type LogRecord = Record<string, unknown>

export interface GatewayProcess {
  child: ChildProcessWithoutNullStreams
  stdout (): string
  stderr (): string
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null, at: number }>
  /** Resolves with the first stdout JSON line that satisfies `pred`; rejects after `ms`, or when the process exits first. */
  waitForLog (pred: (line: LogRecord) => boolean, ms: number): Promise<LogRecord>
  /** The listeners' URLs, from its "gateway listening" line (LOG_LEVEL info or lower; PORT=0 and ADMIN_PORT=0 work). */
  listening (ms?: number): Promise<{ url: string, wsUrl: string, adminUrl: string }>
}

export interface SpawnOptions {
  /** `dist` (default): node dist/server.js; `src`: src/server.ts through tap's TypeScript loader (no build step). */
  entry?: 'dist' | 'src'
  /** A command that runs node, e.g. ['prlimit', '--nofile=300:300']. */
  wrapper?: string[]
}

interface Teardown { teardown (fn: () => unknown): void }

/** Starts the gateway with exactly `env` (plus PATH, and an empty CONFIG_FILE unless `env` names one). */
export function spawnGateway (t: Teardown, env: Record<string, string>, opts: SpawnOptions = {}): GatewayProcess {
  const script = opts.entry === 'src'
    ? ['--import=@tapjs/typescript/import', join(ROOT, 'src', 'server.ts')]
    : [ENTRY]
  const [command = process.execPath, ...args] = [...(opts.wrapper ?? []), process.execPath, ...script]
  const child = spawn(command, args, {
    cwd: ROOT,
    env: {
      PATH: process.env.PATH ?? '/usr/bin:/bin',
      CONFIG_FILE: writeYaml(''),
      ...(opts.entry === 'src' ? { TS_NODE_TRANSPILE_ONLY: '1' } : {}),
      ...env
    },
    stdio: ['pipe', 'pipe', 'pipe']
  })
  let out = ''
  let err = ''
  const waiters: Array<{ pred: (l: LogRecord) => boolean, resolve: (l: LogRecord) => void }> = []
  const check = (): void => {
    for (const line of out.split('\n')) {
      if (line === '') continue
      let parsed: LogRecord
      try { parsed = JSON.parse(line) as LogRecord } catch { continue }
      for (const w of [...waiters]) {
        if (w.pred(parsed)) {
          waiters.splice(waiters.indexOf(w), 1)
          w.resolve(parsed)
        }
      }
    }
  }
  child.stdout.setEncoding('utf8')
  child.stderr.setEncoding('utf8')
  child.stdout.on('data', (c: string) => { out += c; check() })
  child.stderr.on('data', (c: string) => { err += c })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null, at: number }>((resolve) => {
    child.on('exit', (code, signal) => resolve({ code, signal, at: Date.now() }))
  })
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
  })
  const waitForLog = async (pred: (line: LogRecord) => boolean, ms: number): Promise<LogRecord> => await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no matching log line within ${ms} ms; stdout:\n${out}\nstderr:\n${err}`)), ms)
    waiters.push({ pred, resolve: (l) => { clearTimeout(timer); resolve(l) } })
    exited.then(({ code }) => { clearTimeout(timer); reject(new Error(`exited (${String(code)}) before the log line; stderr:\n${err}`)) }, () => {})
    check()
  })
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    exited,
    waitForLog,
    async listening (ms = 15_000) {
      type Addr = { address: string, port: number }
      const line = await waitForLog((l) => l.msg === 'gateway listening', ms) as { public: Addr[], admin: Addr[] }
      const port = line.public[0]?.port
      const adminPort = line.admin[0]?.port
      return { url: `http://${LOOPBACK}:${String(port)}`, wsUrl: `ws://${LOOPBACK}:${String(port)}`, adminUrl: `http://${LOOPBACK}:${String(adminPort)}` }
    }
  }
}

/**
 * Free ports, and an environment in which the issuer and the app are a port nobody listens on: the JWKS never loads,
 * so the process never gets ready, and every request without a token is refused (401) all the same.
 */
export async function unreachableBackendsEnv (): Promise<{ port: number, admin: number, env: Record<string, string> }> {
  const port = await freePort()
  const admin = await freePort()
  const closed = await freePort()
  return {
    port,
    admin,
    env: {
      HOST: LOOPBACK,
      PORT: String(port),
      ADMIN_HOST: LOOPBACK,
      ADMIN_PORT: String(admin),
      JWT_ISSUER: `http://${LOOPBACK}:${closed}/realms/test`,
      JWT_AUDIENCE: 'gw',
      UPSTREAM_URL: `http://${LOOPBACK}:${closed}`,
      ALLOW_INSECURE_HTTP: 'true'
    }
  }
}
