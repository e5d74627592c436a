// The bench's private Redis servers: `redis-server` on a free loopback port,
// no persistence, pinned with the subjects, killed with every other child (and
// by the kernel if the runner is SIGKILLed: setpriv --pdeathsig). The shared
// Redis on 6379 is never touched. Plus a minimal RESP client for PING, INFO
// and DBSIZE (no dependency).
import { execFileSync } from 'node:child_process'
import net from 'node:net'
import { describeTail, freePorts, spawnProcess } from './children.mjs'

export function redisServerVersion () {
  try {
    return execFileSync('redis-server', ['--version'], { encoding: 'utf8' }).trim()
  } catch {
    return undefined
  }
}

/** Starts a private redis-server (on `port`, or a free one); resolves once it answers PING. */
export async function startRedis (name, { pin, env, dir, port: wantedPort }) {
  const port = wantedPort ?? (await freePorts(1))[0]
  const child = spawnProcess(name, 'redis-server', [
    '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
    '--dir', dir, '--daemonize', 'no', '--loglevel', 'warning', '--databases', '1'
  ], { env, pin, pdeathsig: true })
  const deadline = Date.now() + 10_000
  let last = 'no answer'
  while (Date.now() < deadline) {
    if (child.exited) throw new Error(`${name} exited (${child.exitInfo}) before it was ready\n${describeTail(child)}`)
    try {
      if ((await redisCommand(port, ['PING'], 500)) === 'PONG') {
        return { child, pid: child.pid, port, url: `redis://127.0.0.1:${port}` }
      }
    } catch (err) {
      last = err.code ?? err.message
    }
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  throw new Error(`${name} did not answer PING on port ${port} within 10 s (last: ${last})\n${describeTail(child)}`)
}

/** One command on a fresh connection; resolves with the reply (string, number or null). */
export function redisCommand (port, args, timeoutMs = 2_000) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1')
    let buf = Buffer.alloc(0)
    const done = (err, value) => {
      clearTimeout(timer)
      sock.destroy()
      if (err) reject(err)
      else resolve(value)
    }
    const timer = setTimeout(() => done(Object.assign(new Error(`redis ${args[0]} timed out`), { code: 'ETIMEDOUT' })), timeoutMs)
    sock.on('error', (err) => done(err))
    sock.on('connect', () => {
      sock.write(`*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`).join(''))
    })
    sock.on('data', (chunk) => {
      buf = Buffer.concat([buf, chunk])
      const r = parseReply(buf)
      if (r !== undefined) done(r.error ? new Error(r.error) : null, r.value)
    })
  })
}

/** A complete simple/bulk/integer/error reply, or undefined while incomplete. */
function parseReply (buf) {
  const eol = buf.indexOf('\r\n')
  if (eol === -1) return undefined
  const type = String.fromCharCode(buf[0])
  const head = buf.subarray(1, eol).toString()
  if (type === '+') return { value: head }
  if (type === '-') return { error: head }
  if (type === ':') return { value: Number(head) }
  if (type === '$') {
    const len = Number(head)
    if (len < 0) return { value: null }
    if (buf.length < eol + 2 + len + 2) return undefined
    return { value: buf.subarray(eol + 2, eol + 2 + len).toString() }
  }
  return { error: `unsupported reply type ${type}` }
}

/** INFO <section> as { key: value }. */
export async function redisInfo (port, section) {
  const text = await redisCommand(port, ['INFO', section])
  const out = {}
  for (const line of text.split('\r\n')) {
    const i = line.indexOf(':')
    if (i > 0 && !line.startsWith('#')) out[line.slice(0, i)] = line.slice(i + 1)
  }
  return out
}

/**
 * Calls per command from INFO commandstats ({ evalsha: 12, incr: 12, ... }),
 * or undefined if Redis does not answer. Commands run inside a Lua script
 * (redis.call) are counted too, under their own names.
 */
export async function redisCommandStats (port) {
  try {
    const info = await redisInfo(port, 'commandstats')
    const out = {}
    for (const [k, v] of Object.entries(info)) {
      const m = /^cmdstat_(.+)$/.exec(k)
      const calls = /calls=(\d+)/.exec(v)
      if (m && calls) out[m[1]] = Number(calls[1])
    }
    return out
  } catch {
    return undefined
  }
}

/** total_commands_processed, or undefined if Redis does not answer. */
export async function redisCommandsProcessed (port) {
  try {
    return Number((await redisInfo(port, 'stats')).total_commands_processed)
  } catch {
    return undefined
  }
}
