// Real Redis for tests, never a mock. The machine's shared Redis on 127.0.0.1:6379 is used when it answers (tests
// pick DB 11 and their own key prefixes, and flush only their own keys); otherwise a private `redis-server` is started
// on a free loopback port for this test process. Tests that kill Redis always start their own with startRedisServer().
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { createServer, connect, type AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export const TEST_DB = 11

let shared: Promise<string> | undefined

export async function freePort (): Promise<number> {
  const s = createServer()
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve))
  const port = (s.address() as AddressInfo).port
  await new Promise((resolve) => s.close(resolve))
  return port
}

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
    if (Date.now() > deadline) throw new Error(`redis-server did not answer on port ${p}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
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

/** URL of a Redis for ordinary tests: the shared one (DB 11) or a private server. */
export function redisUrl (): Promise<string> {
  shared ??= (async () => {
    if (await ping(6379)) return `redis://127.0.0.1:6379/${TEST_DB}`
    const server = await startRedisServer()
    return `redis://127.0.0.1:${server.port}/${TEST_DB}`
  })()
  return shared
}
