// `npm run demo` (scripts/demo.mjs), followed as a user would: start it, wait for the printed commands, paste each
// one into bash and check what it shows (200, 401, 403, the 429 loop, the WebSocket greeting and echo, metrics, a
// fresh token, revocation), then Ctrl-C: exit 0 within seconds, every port free again and no child left running.
// `npm run demo` itself (npm -> sh -> node) exits 0 when Ctrl-C signals the whole process group.
// Also: a part that dies stops the demo with exit 1 and a message; a busy port is refused before anything starts.
import { execFileSync, spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process'
import { once } from 'node:events'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import net, { type AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import t, { type Test } from 'tap'
import { canBind, freePort } from './helpers/ports.js'
import { until } from './helpers/wait.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const DEMO = join(ROOT, 'scripts', 'demo.mjs')
const LOOPBACK = '127.0.0.1'

t.before(() => {
  if (!existsSync(join(ROOT, 'dist', 'server.js')) || !existsSync(join(ROOT, 'dist', 'cli.js'))) {
    execFileSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'ignore' })
  }
})

const HAVE_CURL = spawnSync('curl', ['--version'], { stdio: 'ignore' }).status === 0

function alive (pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

interface Exit { code: number | null, signal: NodeJS.Signals | null, at: number }

interface Demo {
  child: ChildProcessWithoutNullStreams
  out: () => string
  err: () => string
  exited: Promise<Exit>
  waitFor: (re: RegExp, ms: number) => Promise<RegExpMatchArray>
}

function startDemo (t: Test, env: Record<string, string>): Demo {
  // The environment of a fresh shell: nothing from tap (NODE_OPTIONS loaders, coverage).
  const child = spawn(process.execPath, [DEMO], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? ROOT, ...env },
    stdio: ['pipe', 'pipe', 'pipe']
  })
  let out = ''
  let err = ''
  child.stdout.setEncoding('utf8')
  child.stderr.setEncoding('utf8')
  child.stdout.on('data', (c: string) => { out += c })
  child.stderr.on('data', (c: string) => { err += c })
  const exited = new Promise<Exit>((resolve) => {
    child.on('exit', (code, signal) => resolve({ code, signal, at: Date.now() }))
  })
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exited
    }
  })
  const waitFor = async (re: RegExp, ms: number): Promise<RegExpMatchArray> => {
    let m: RegExpMatchArray | null = null
    await until(() => {
      m = out.match(re)
      if (m !== null) return true
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`demo exited (${String(child.exitCode ?? child.signalCode)}) before ${String(re)}\nstdout:\n${out}\nstderr:\n${err}`)
      }
      return false
    }, ms, () => `${String(re)}\nstdout:\n${out}\nstderr:\n${err}`, 100)
    return m as unknown as RegExpMatchArray
  }
  return { child, out: () => out, err: () => err, exited, waitFor }
}

/** The printed commands: a `# [id] ...` line followed by a `$ <command>` line. */
function commandsOf (out: string): Map<string, string> {
  const lines = out.split('\n')
  const cmds = new Map<string, string>()
  for (let i = 0; i < lines.length - 1; i++) {
    const id = /^# \[([a-z0-9-]+)\] /.exec(lines[i] as string)?.[1]
    const next = lines[i + 1] as string
    if (id !== undefined && next.startsWith('$ ')) cmds.set(id, next.slice(2))
  }
  return cmds
}

interface Run { code: number | null, stdout: string, stderr: string }

/** Runs a printed command as a user pasting it would: bash, from the repository root. */
async function paste (cmd: string): Promise<Run> {
  const child = spawn('bash', ['-c', cmd], { cwd: ROOT, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? ROOT }, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.setEncoding('utf8')
  child.stderr.setEncoding('utf8')
  child.stdout.on('data', (c: string) => { stdout += c })
  child.stderr.on('data', (c: string) => { stderr += c })
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000)
  const [code] = await once(child, 'close') as [number | null]
  clearTimeout(timer)
  return { code, stdout, stderr }
}

/** Status code of `curl -i` output (the last response head, in case of a 100 Continue). */
function statusOf (curlOutput: string): number {
  const heads = [...curlOutput.matchAll(/^HTTP\/[\d.]+ (\d{3})/gm)]
  return Number(heads.at(-1)?.[1] ?? 0)
}

t.test('npm run demo: every printed command does what it says; Ctrl-C stops everything', { skip: HAVE_CURL ? false : 'curl is not installed (the printed commands use it)' }, async (t) => {
  const port = await freePort()
  const adminPort = await freePort()
  const demo = startDemo(t, { DEMO_PORT: String(port), DEMO_ADMIN_PORT: String(adminPort) })
  await demo.waitFor(/^Press Ctrl-C to stop/m, 60_000)
  const out = demo.out()

  t.match(out, /DEVELOPMENT ISSUER — never use in production/, 'the development issuer is labelled loudly')
  const issuerPort = Number(out.match(/^## {2}http:\/\/127\.0\.0\.1:(\d+)\/realms\//m)?.[1])
  const appPort = Number(out.match(/stand-in app http:\/\/127\.0\.0\.1:(\d+)/)?.[1])
  const pids = out.match(/^Processes: gateway pid=(\d+) app pid=(\d+)/m)
  t.ok(issuerPort > 0 && appPort > 0 && pids !== null, 'issuer and app ports and the child pids are printed')
  const [gatewayPid, appPid] = [Number(pids?.[1]), Number(pids?.[2])]
  t.match(out, `Metrics: http://127.0.0.1:${adminPort}/metrics`, 'the metrics URL is printed')

  const cmds = commandsOf(out)
  t.same([...cmds.keys()].sort(), ['forbidden', 'logout', 'metrics', 'new-token', 'no-token', 'premium', 'public', 'rate-limit', 'revoke', 'valid-token', 'websocket'],
    'one command per thing to try, each on its own "$ " line')
  const cmd = (id: string): string => {
    const c = cmds.get(id)
    if (c === undefined) throw new Error(`no [${id}] command in:\n${out}`)
    return c
  }
  const bobToken = /Bearer (ey[\w-]+\.[\w-]+\.[\w-]+)/.exec(cmd('valid-token'))?.[1] as string
  t.ok(bobToken, 'a real token is pasted into the command')
  t.match(cmd('valid-token'), `http://127.0.0.1:${port}/api/resonance/entries`)

  const valid = await paste(cmd('valid-token'))
  t.equal(statusOf(valid.stdout), 200, 'valid token -> 200')
  t.match(valid.stdout, /"sub":"bob"/, 'the stand-in app saw the verified identity')

  const none = await paste(cmd('no-token'))
  t.equal(statusOf(none.stdout), 401, 'no token -> 401')
  t.match(none.stdout, /^www-authenticate: Bearer/im)

  t.equal(statusOf((await paste(cmd('public'))).stdout), 200, 'public path without a token -> 200')
  t.equal(statusOf((await paste(cmd('premium'))).stdout), 200, 'premium user on the premium route -> 200')
  t.equal(statusOf((await paste(cmd('forbidden'))).stdout), 403, 'normal user on the premium route -> 403')

  const loop = await paste(cmd('rate-limit'))
  t.equal(loop.code, 0)
  const lines = loop.stdout.trim().split('\n')
  const codes = lines.map((l) => l.split(' ')[0])
  t.equal(codes.length, 12, 'the loop makes 12 requests')
  t.match(codes.join(' '), /^(200 )+429( 429)*$/, `200s, then only 429s: ${codes.join(' ')}`)
  t.ok(codes.filter((c) => c === '200').length <= 10, 'at most the budget of 10 passes')
  // What the step promises: each 429 line shows its Retry-After (seconds until the window resets); a 200 line does not.
  for (const l of lines) {
    if (l.startsWith('429')) t.match(l, /^429 {2}Retry-After: ([1-9]|[1-5]\d|60)$/, `a 429 line shows Retry-After: ${l}`)
    else t.equal(l, '200', 'a 200 line is just the status')
  }

  const ws = await paste(cmd('websocket'))
  t.equal(ws.code, 0, `the WebSocket line exits 0 (stderr: ${ws.stderr})`)
  const received = ws.stdout.trim().split('\n')
  t.equal(received.at(-1), 'hello from the demo', 'the stand-in echoed the message through the gateway')
  // The stand-in greets on connect, before the client speaks: the gateway must not lose what the app sends in the
  // same TCP chunk as its 101 (regression: it once attached its app->client listener only after the client's 101).
  t.equal(received[0], '{"hello":"alice"}', 'the stand-in\'s greeting (sent before any client message) arrives first')

  const metrics = await paste(cmd('metrics'))
  t.match(metrics.stdout, /^resonance_http_requests_total\{status_class="2xx"\} \d+/m, 'metrics served on the admin port')
  t.match(metrics.stdout, /^resonance_rate_limit_triggered_total\{transport="http"\} [1-9]/m, '429s counted')
  t.match(metrics.stdout, /^resonance_auth_failures_total\{reason="missing_token",transport="http"\} [1-9]/m, '401s counted by reason')

  t.equal(statusOf((await paste(cmd('new-token'))).stdout), 200, 'a freshly minted token works')

  // Logout at the development issuer: it POSTs a logout token to the gateway, which ends the session.
  const logout = await paste(cmd('logout'))
  t.equal(logout.code, 0, `the logout line exits 0 (stderr: ${logout.stderr})`)
  t.match(logout.stdout, /^WebSocket open$/m, 'the session held a WebSocket')
  t.match(logout.stdout, /^issuer logout: .*"gateway":200/m, 'the gateway accepted the logout token (200)')
  const closed = /^WebSocket closed: 1008 session ended \((\d+) ms after the logout\)$/m.exec(logout.stdout)
  t.ok(closed !== null, `the WebSocket closed with 1008 "session ended": ${logout.stdout}`)
  // Counted from before the pasted line's first fetch (undici loads then, in both processes): the 1 s bound on the
  // logout itself is test/backchannel-logout.test.ts's (a few ms on loopback); this bound only says "closed promptly".
  t.ok(Number(closed?.[1]) < 5000, `closed promptly after the logout (${closed?.[1]} ms)`)
  t.match(logout.stdout, /^next request: HTTP 401 Bearer .*error="invalid_token"/m, 'the session\'s next request gets 401')
  t.match(demo.out(), /^\[gateway\] warn: back-channel logout .*result=accepted/m, 'the logout is an audit line in the demo output')

  const revoke = await paste(cmd('revoke'))
  t.equal(revoke.code, 0, `revoke via the CLI exits 0 (stderr: ${revoke.stderr})`)
  t.match(revoke.stdout, /"kind":"sub"/)
  const after = await paste(cmd('valid-token'))
  t.equal(statusOf(after.stdout), 401, 'after revocation bob\'s token -> 401')

  t.match(demo.out(), /^\[gateway\] warn: denied .*reason=missing_token/m, 'denials show up as audit lines in the demo output')
  const gatewayLines = demo.out().split('\n').filter((l) => l.startsWith('[gateway]'))
  t.notOk(gatewayLines.some((l) => l.includes(bobToken)), 'no token in the gateway\'s log lines')

  const sent = Date.now()
  demo.child.kill('SIGINT')
  const exit = await demo.exited
  t.equal(exit.code, 0, `Ctrl-C: exit 0 (stderr: ${demo.err()})`)
  t.ok(exit.at - sent < 8000, `stopped within seconds (${exit.at - sent} ms)`)
  t.match(demo.out(), /demo: stopped/)
  for (const [what, p] of [['gateway', port], ['admin', adminPort], ['issuer', issuerPort], ['app', appPort]] as const) {
    t.ok(await canBind(p), `${what} port ${p} is free again`)
  }
  t.notOk(alive(gatewayPid), 'the gateway process is gone')
  t.notOk(alive(appPid), 'the stand-in app process is gone')
})

const NPM = (process.env.PATH ?? '').split(':').map((d) => join(d, 'npm')).find((f) => existsSync(f))

t.test('`npm run demo` and Ctrl-C in a terminal: npm, its shell and the demo get SIGINT; npm exits 0', { skip: NPM === undefined ? 'npm is not on PATH' : false }, async (t) => {
  // A terminal's Ctrl-C signals the whole foreground process group: npm, the shell running the script and the demo
  // (npm also forwards the signal to its child). The script's `npm run build` is stubbed (dist/ was built in
  // t.before): rebuilding dist/ here would race the other test files that run it.
  const realNpm = NPM as string
  const bin = mkdtempSync(join(tmpdir(), 'demo-npm-'))
  t.teardown(() => rmSync(bin, { recursive: true, force: true }))
  writeFileSync(join(bin, 'npm'), `#!/bin/sh\n[ "$1 $2" = "run build" ] && exit 0\nexec ${JSON.stringify(realNpm)} "$@"\n`, { mode: 0o755 })
  const port = await freePort()
  const adminPort = await freePort()
  const child = spawn(realNpm, ['run', 'demo'], {
    cwd: ROOT,
    env: { PATH: `${bin}:${process.env.PATH ?? '/usr/bin:/bin'}`, HOME: process.env.HOME ?? ROOT, DEMO_PORT: String(port), DEMO_ADMIN_PORT: String(adminPort) },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true // its own process group, as a terminal's foreground job
  })
  let out = ''
  child.stdout.setEncoding('utf8').on('data', (c: string) => { out += c })
  child.stderr.setEncoding('utf8').on('data', (c: string) => { out += c })
  const exited = new Promise<Exit>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal, at: Date.now() })))
  t.teardown(() => { try { process.kill(-(child.pid as number), 'SIGKILL') } catch {} })
  await until(() => {
    if (/^Press Ctrl-C to stop/m.test(out)) return true
    if (child.exitCode !== null) throw new Error(`npm run demo exited before it got ready:\n${out}`)
    return false
  }, 60_000, () => `npm run demo did not get ready:\n${out}`, 100)
  const pids = out.match(/^Processes: gateway pid=(\d+) app pid=(\d+) demo pid=(\d+)/m)
  process.kill(-(child.pid as number), 'SIGINT')
  const exit = await exited
  t.same({ code: exit.code, signal: exit.signal }, { code: 0, signal: null }, `npm run demo exits 0 on Ctrl-C:\n${out.split('\n').slice(-6).join('\n')}`)
  t.match(out, /demo: stopped/, 'after the demo\'s own cleanup')
  for (const pid of [pids?.[1], pids?.[2], pids?.[3]]) t.notOk(alive(Number(pid)), `process ${String(pid)} is gone`)
  t.ok(await canBind(port), 'gateway port free')
  t.ok(await canBind(adminPort), 'admin port free')
})

t.test('a part that dies stops the demo: exit 1 with a message, nothing left running', async (t) => {
  const port = await freePort()
  const adminPort = await freePort()
  const demo = startDemo(t, { DEMO_PORT: String(port), DEMO_ADMIN_PORT: String(adminPort) })
  const m = await demo.waitFor(/^Processes: gateway pid=(\d+) app pid=(\d+)/m, 60_000)
  const [gatewayPid, appPid] = [Number(m[1]), Number(m[2])]
  process.kill(appPid, 'SIGKILL')
  const exit = await demo.exited
  t.equal(exit.code, 1, 'exit 1')
  t.match(demo.err(), /the app exited on its own \(SIGKILL\)/, 'says which part died')
  t.notOk(alive(gatewayPid), 'the gateway was stopped too')
  t.ok(await canBind(port), 'gateway port free')
  t.ok(await canBind(adminPort), 'admin port free')
})

t.test('the demo killed without cleanup (SIGKILL): its children stop by themselves', async (t) => {
  const port = await freePort()
  const adminPort = await freePort()
  const demo = startDemo(t, { DEMO_PORT: String(port), DEMO_ADMIN_PORT: String(adminPort) })
  const m = await demo.waitFor(/^Processes: gateway pid=(\d+) app pid=(\d+)/m, 60_000)
  const pids = [Number(m[1]), Number(m[2])]
  demo.child.kill('SIGKILL')
  await demo.exited
  // bounded wait; the assertion below reports whoever is still alive
  await until(() => !pids.some(alive), 8000, 'gateway and app exited', 100).catch(() => {})
  t.same(pids.filter(alive), [], 'gateway and app exited (orphan guard)')
  t.ok(await canBind(port), 'gateway port free')
  t.ok(await canBind(adminPort), 'admin port free')
})

t.test('a busy port is refused before anything starts', async (t) => {
  const busy = net.createServer()
  busy.listen(0, LOOPBACK)
  await once(busy, 'listening')
  t.teardown(() => { busy.close() })
  const demo = startDemo(t, { DEMO_PORT: String((busy.address() as AddressInfo).port), DEMO_ADMIN_PORT: String(await freePort()) })
  const exit = await demo.exited
  t.equal(exit.code, 1)
  t.match(demo.err(), /port \d+ on 127\.0\.0\.1 is in use: .*DEMO_PORT=/)
  t.notMatch(demo.out(), /DEVELOPMENT ISSUER/, 'nothing was started')
})
