// Real Redis for tests, never a mock. The machine's shared Redis on 127.0.0.1:6379 is used when it answers (tests
// pick DB 11 and their own key prefixes, and flush only their own keys); otherwise a private `redis-server` is started
// on a free loopback port for this test process. Tests that kill Redis always start their own with startRedisServer().
import { spawn, type ChildProcess } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtempSync } from 'node:fs'
import { connect } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Redis } from 'ioredis'
import { freePort } from './ports.js'

export const TEST_DB = 11

let shared: Promise<string> | undefined

/** PING over a raw socket (no client library): true when a Redis answers PONG. */
export function ping (port: number, host = '127.0.0.1', timeoutMs = 500): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, host)
    const done = (ok: boolean): void => { socket.destroy(); resolve(ok) }
    socket.setTimeout(timeoutMs, () => done(false))
    socket.once('error', () => done(false))
    socket.once('connect', () => socket.write('PING\r\n'))
    socket.once('data', (d) => done(d.toString().startsWith('+PONG')))
  })
}

export interface RedisServer {
  port: number
  url: string
  process: ChildProcess
  stop (): Promise<void>
  /** SIGKILL, as a crash would. */
  kill (): Promise<void>
}

/** A private redis-server on a free loopback port, stopped when the test process exits. */
export async function startRedisServer (port?: number, extraArgs: string[] = []): Promise<RedisServer> {
  const p = port ?? await freePort()
  const dir = mkdtempSync(join(tmpdir(), 'gw-redis-'))
  const child = spawn('redis-server', ['--port', String(p), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir, ...extraArgs], { stdio: 'ignore' })
  const onExit = (): void => { child.kill('SIGKILL') }
  process.once('exit', onExit)
  const spawnError = new Promise<never>((_resolve, reject) => child.once('error', (err) => reject(new Error(`redis-server could not start (is it installed? apt-get install redis-server): ${err.message}`))))
  const deadline = Date.now() + 5000
  while (!(await Promise.race([ping(p), spawnError]))) {
    if (Date.now() > deadline) {
      child.kill('SIGKILL')
      process.removeListener('exit', onExit)
      throw new Error(`redis-server did not answer on port ${p}`)
    }
    await sleep(20)
  }
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  return {
    port: p,
    url: `redis://127.0.0.1:${p}/0`,
    process: child,
    async stop () { child.kill('SIGTERM'); await exited; process.removeListener('exit', onExit) },
    async kill () { child.kill('SIGKILL'); await exited; process.removeListener('exit', onExit) }
  }
}

export interface Teardown { teardown (fn: () => unknown): void }

/** A private redis-server (startRedisServer), the only kind a test may stop, freeze or kill; killed when `t` ends. */
export async function ownRedis (t: Teardown, port?: number, extraArgs: string[] = []): Promise<RedisServer> {
  const server = await startRedisServer(port, extraArgs)
  t.teardown(async () => {
    if (server.process.exitCode !== null || server.process.signalCode !== null) return
    server.process.kill('SIGCONT') // a test may have frozen it (SIGSTOP)
    await server.kill()
  })
  return server
}

/** A RATE_LIMIT_KEY_PREFIX of its own (`test:<uuid>:`), so tests on one Redis never share a key. */
export function keyPrefix (): string {
  return `test:${randomUUID()}:`
}

export interface SharedRedis {
  /** The Redis of redisUrl(). */
  url: string
  /** A connected client to it (one retry per request). */
  client: Redis
  /** A new key prefix (keyPrefix()) whose keys, and only those, are deleted when `t` ends. */
  freshPrefix (): string
}

/**
 * The Redis for ordinary tests, for the life of `t` (a whole file: the root `t`): a client, and key prefixes whose keys
 * are deleted at the end, after every subtest and its gateways ended.
 */
export async function sharedRedis (t: Teardown): Promise<SharedRedis> {
  const url = await redisUrl()
  const client = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1 })
  await client.connect()
  const prefixes: string[] = []
  t.teardown(async () => {
    for (const p of prefixes) await deleteKeys(client, p)
    client.disconnect()
  })
  return {
    url,
    client,
    freshPrefix () {
      const p = keyPrefix()
      prefixes.push(p)
      return p
    }
  }
}

/** URL of a Redis for ordinary tests: the shared one (DB 11) or a private server. */
export function redisUrl (): Promise<string> {
  shared ??= (async () => {
    if (await ping(6379)) return `redis://127.0.0.1:6379/${TEST_DB}`
    const server = await startRedisServer()
    return `redis://127.0.0.1:${server.port}/${TEST_DB}`
  })()
  return shared
}

// --- additions for the rate-limit tests (test/limits*.test.ts) ------------------------------------------------------

/** Escapes Redis glob metacharacters so a key prefix can be used in SCAN MATCH. */
export function globEscape (s: string): string {
  return s.replace(/[*?[\]\\]/g, '\\$&')
}

/** A plain ioredis client (one Cluster node included: SCAN is per node). */
type ScanClient = Redis

/** Every key starting with `prefix` on one Redis (SCAN, never KEYS on the shared server). */
export async function scanKeys (client: ScanClient, prefix: string): Promise<string[]> {
  const out: string[] = []
  let cursor = '0'
  do {
    const [next, keys] = await client.scan(cursor, 'MATCH', `${globEscape(prefix)}*`, 'COUNT', 1000)
    cursor = next
    out.push(...keys)
  } while (cursor !== '0')
  return out
}

/** Deletes only the keys starting with `prefix` (a test's own keys); returns how many. */
export async function deleteKeys (client: ScanClient, prefix: string): Promise<number> {
  if (prefix === '') throw new Error('deleteKeys: refusing an empty prefix')
  const keys = await scanKeys(client, prefix)
  let n = 0
  // one DEL per key: keys of a Cluster live in different slots
  for (const k of keys) n += await client.del(k)
  return n
}

export interface RedisCluster {
  nodes: RedisServer[]
  /** `host:port` seeds, comma separated (REDIS_CLUSTER_NODES). */
  seeds: string
  stop (): Promise<void>
}

/** Sends one command with redis-cli and returns its output. */
export function redisCli (args: string[], timeoutMs = 15_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('redis-cli', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    let err = ''
    child.stdout.on('data', (c: Buffer) => { out += c.toString() })
    child.stderr.on('data', (c: Buffer) => { err += c.toString() })
    const timer = setTimeout(() => { child.kill('SIGKILL') }, timeoutMs)
    child.once('error', (e) => { clearTimeout(timer); reject(e) })
    child.once('exit', (code) => {
      clearTimeout(timer)
      if (code === 0) resolve(out)
      else reject(new Error(`redis-cli ${args.join(' ')} exited ${String(code)}: ${err}${out}`))
    })
  })
}

/**
 * A private Redis Cluster: `n` masters (`--cluster-enabled yes`, no replicas) on free loopback ports, each with an
 * explicit free cluster-bus port (port + 10000 may be taken or above 65535), joined with
 * `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`. Resolves once every node reports
 * cluster_state:ok.
 */
export async function startRedisCluster (n = 3): Promise<RedisCluster> {
  const nodes: RedisServer[] = []
  try {
    for (let i = 0; i < n; i++) {
      const bus = await freePort()
      nodes.push(await startRedisServer(undefined, ['--cluster-enabled', 'yes', '--cluster-port', String(bus), '--cluster-node-timeout', '5000']))
    }
    const addrs = nodes.map((s) => `127.0.0.1:${s.port}`)
    await redisCli(['--cluster', 'create', ...addrs, '--cluster-replicas', '0', '--cluster-yes'])
    const deadline = Date.now() + 15_000
    for (const node of nodes) {
      while (!(await redisCli(['-p', String(node.port), 'cluster', 'info'])).includes('cluster_state:ok')) {
        if (Date.now() > deadline) throw new Error(`redis cluster node ${node.port} did not reach cluster_state:ok`)
        await sleep(50)
      }
    }
    return {
      nodes,
      seeds: addrs.join(','),
      async stop () { await Promise.all(nodes.map((s) => s.stop())) }
    }
  } catch (err) {
    await Promise.all(nodes.map((s) => s.kill()))
    throw err
  }
}
