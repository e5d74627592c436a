// Child processes of the bench: spawning (pinned to the subject CPU when
// possible), their stdout hello line, log tails, per-process CPU time from
// /proc, and killing every one of them on any exit path.
import { spawn, execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import net from 'node:net'
import { fileURLToPath, pathToFileURL } from 'node:url'

const GUARD = pathToFileURL(fileURLToPath(new URL('./orphan-guard.mjs', import.meta.url))).href
const TAIL_LINES = 40

/** Every live child; killed on exit, signal and error (see installCleanup). */
const children = new Set()

// ---------------------------------------------------------------- pinning --

const onPath = new Map()
/** Whether `cmd` is an executable on PATH (asked once per command). */
export function hasCommand (cmd) {
  if (!onPath.has(cmd)) {
    try {
      execFileSync('sh', ['-c', 'command -v "$1"', 'sh', cmd], { stdio: 'ignore' })
      onPath.set(cmd, true)
    } catch {
      onPath.set(cmd, false)
    }
  }
  return onPath.get(cmd)
}

/** "0-2,5" -> [0, 1, 2, 5] */
export function parseCpuList (s) {
  const cpus = []
  for (const part of s.trim().split(',')) {
    const [a, b] = part.split('-').map(Number)
    for (let c = a; c <= (b ?? a); c++) cpus.push(c)
  }
  return cpus
}

/**
 * Pins this process (the load generator; -a: every thread) to the first
 * allowed CPU and returns the CPU the subjects will be spawned on. Returns
 * { applied: false, reason } when it cannot (no taskset, fewer than 2 CPUs).
 */
export function setupPinning () {
  if (process.platform !== 'linux') return { applied: false, reason: 'not Linux' }
  if (!hasCommand('taskset')) return { applied: false, reason: 'taskset not found' }
  let allowed
  try {
    const out = execFileSync('taskset', ['-cp', String(process.pid)], { encoding: 'utf8' })
    allowed = parseCpuList(out.slice(out.lastIndexOf(':') + 1))
  } catch (err) {
    return { applied: false, reason: `taskset -cp failed: ${err.message}` }
  }
  if (allowed.length < 2) return { applied: false, reason: `only ${allowed.length} CPU allowed (${allowed.join(',')})` }
  const loadgenCpu = allowed[0]
  const subjectCpu = allowed[1]
  try {
    execFileSync('taskset', ['-a', '-cp', String(loadgenCpu), String(process.pid)], { stdio: 'ignore' })
  } catch (err) {
    return { applied: false, reason: `could not pin the load generator: ${err.message}` }
  }
  return { applied: true, loadgenCpu, subjectCpu, allowed }
}

// --------------------------------------------------------------- spawning --

/**
 * Starts `node ...execArgv --import orphan-guard <script> ...args`, under `taskset -c
 * <cpu>` when pinning applies (taskset execs node, so child.pid is node's).
 * `node`: another Node binary than this process's.
 */
export function spawnNode (name, script, { args = [], execArgv = [], env = process.env, cwd, pin, node = process.execPath } = {}) {
  return spawnProcess(name, node, [...execArgv, '--import', GUARD, script, ...args], { env, cwd, pin })
}

/**
 * Starts any executable, pinned like spawnNode. `pdeathsig: true` (for
 * non-Node children, which cannot load the orphan guard) execs it through
 * `setpriv --pdeathsig SIGKILL` when available, so it dies with the runner
 * even if the runner is SIGKILLed. child.pid is the executable's own pid
 * (taskset and setpriv exec, they do not fork).
 */
export function spawnProcess (name, cmd, cmdArgs, { env = process.env, cwd, pin, pdeathsig = false } = {}) {
  let argv = [cmd, ...cmdArgs]
  if (pdeathsig && hasCommand('setpriv')) argv = ['setpriv', '--pdeathsig', 'SIGKILL', ...argv]
  if (pin?.applied) argv = ['taskset', '-c', String(pin.subjectCpu), ...argv]
  const child = spawn(argv[0], argv.slice(1), { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] })
  child.benchName = name
  child.stdoutTail = []
  child.stderrTail = []
  child.lines = [] // stdout lines after markSteady(), for the report
  child.lineListeners = new Set() // (line) => void, every stdout line
  child.steady = false
  child.exited = false
  children.add(child)

  let resolveHello, rejectHello
  child.hello = new Promise((resolve, reject) => { resolveHello = resolve; rejectHello = reject })
  child.hello.catch(() => {}) // not every child prints one

  lineReader(child.stdout, (line) => {
    for (const l of child.lineListeners) l(line)
    if (line.startsWith('{"benchMem"')) return // the memory probe's answers are not logs
    push(child.stdoutTail, line)
    if (child.steady) child.lines.push(line)
    if (line.startsWith('{"port"')) {
      try { resolveHello(JSON.parse(line)) } catch {}
    }
  })
  lineReader(child.stderr, (line) => push(child.stderrTail, line))
  child.on('exit', (code, signal) => {
    child.exited = true
    child.exitInfo = signal ?? `code ${code}`
    children.delete(child)
    rejectHello(new Error(`${name} exited (${child.exitInfo}) before it was ready\n${describeTail(child)}`))
    if (!child.expectedExit && child.onUnexpectedExit) child.onUnexpectedExit(child)
  })
  child.on('error', (err) => rejectHello(err))
  return child
}

/** Stops one child: SIGTERM, then SIGKILL after graceMs. Resolves when it has exited. */
export function stopChild (child, graceMs = 2_000) {
  return new Promise((resolve) => {
    if (child.exited) return resolve()
    child.expectedExit = true
    const timer = setTimeout(() => { try { child.kill('SIGKILL') } catch {} }, graceMs)
    child.once('exit', () => { clearTimeout(timer); resolve() })
    try { child.kill('SIGTERM') } catch { resolve() }
  })
}

function push (tail, line) {
  tail.push(line)
  if (tail.length > TAIL_LINES) tail.shift()
}

function lineReader (stream, onLine) {
  let buf = ''
  stream.setEncoding('utf8')
  stream.on('data', (chunk) => {
    buf += chunk
    let i
    while ((i = buf.indexOf('\n')) !== -1) {
      onLine(buf.slice(0, i))
      buf = buf.slice(i + 1)
    }
  })
}

export function describeTail (child) {
  const out = child.stdoutTail.length ? `  stdout:\n    ${child.stdoutTail.join('\n    ')}\n` : ''
  const err = child.stderrTail.length ? `  stderr:\n    ${child.stderrTail.join('\n    ')}\n` : ''
  return out + err || '  (no output)\n'
}

/** Waits for the child's {"port":...} line. */
export async function waitHello (child, timeoutMs = 15_000) {
  let timer
  const timeout = new Promise((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${child.benchName} did not report its port within ${timeoutMs} ms\n${describeTail(child)}`)), timeoutMs)
  })
  try {
    return await Promise.race([child.hello, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** Polls `url` until it answers 2xx; fails early if the child exits. */
export async function waitHttpOk (child, url, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs
  let last = 'no answer'
  while (Date.now() < deadline) {
    if (child.exited) throw new Error(`${child.benchName} exited (${child.exitInfo}) before it was ready\n${describeTail(child)}`)
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(1000) })
      const body = await res.text()
      if (res.ok) return
      last = `${res.status} ${body.slice(0, 300)}`
    } catch (err) {
      last = err.cause?.code ?? err.message
    }
    await new Promise((resolve) => setTimeout(resolve, 100))
  }
  throw new Error(`${child.benchName} not ready at ${url} after ${timeoutMs} ms (last: ${last})\n${describeTail(child)}`)
}

/** N free loopback ports (listen on 0, read, close; all held open together so they differ). */
export async function freePorts (n) {
  const servers = await Promise.all(Array.from({ length: n }, () => new Promise((resolve, reject) => {
    const s = net.createServer()
    s.once('error', reject)
    s.listen(0, '127.0.0.1', () => resolve(s))
  })))
  const ports = servers.map((s) => s.address().port)
  await Promise.all(servers.map((s) => new Promise((resolve) => s.close(resolve))))
  return ports
}

// -------------------------------------------------------------------- CPU --

let clkTck
function ticksPerSecond () {
  if (clkTck === undefined) {
    try {
      clkTck = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100
    } catch {
      clkTck = 100
    }
  }
  return clkTck
}

/** utime+stime of a whole process (all threads) in seconds, or undefined without /proc. */
export function cpuSeconds (pid) {
  let stat
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  } catch {
    return undefined
  }
  // Fields after "(comm)": state is field 3, utime 14, stime 15.
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return (Number(rest[11]) + Number(rest[12])) / ticksPerSecond()
}

/** Resident set size of a process in KiB (VmRSS from /proc/<pid>/status), or undefined. */
export function rssKiB (pid) {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
    return m ? Number(m[1]) : undefined
  } catch {
    return undefined
  }
}

/** Soft limit on open files of this process (children inherit it), or undefined. */
export function openFilesLimit () {
  try {
    const m = /^Max open files\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'))
    return m === null ? undefined : m[1] === 'unlimited' ? Infinity : Number(m[1])
  } catch {
    return undefined
  }
}

/**
 * Busy CPU seconds (user+nice+system+irq+softirq+steal from /proc/stat) of
 * one CPU, or of all CPUs when `cpu` is undefined; undefined without /proc.
 * Minus the bench's own processes on that CPU, this is what *other* work did
 * meanwhile: the noise.
 */
export function busySeconds (cpu) {
  let text
  try {
    text = readFileSync('/proc/stat', 'utf8')
  } catch {
    return undefined
  }
  const prefix = cpu === undefined ? 'cpu ' : `cpu${cpu} `
  const line = text.split('\n').find((l) => l.startsWith(prefix))
  if (line === undefined) return undefined
  const [user, nice, system, , , irq, softirq, steal = 0] = line.trim().split(/\s+/).slice(1).map(Number)
  return (user + nice + system + irq + softirq + steal) / ticksPerSecond()
}

// ---------------------------------------------------------------- cleanup --

/** SIGTERM, then SIGKILL whatever is still alive after graceMs. */
export async function stopAll (graceMs = 2_000) {
  await Promise.all([...children].map((child) => stopChild(child, graceMs)))
}

export function killAllNow () {
  for (const child of children) {
    child.expectedExit = true
    try { child.kill('SIGKILL') } catch {}
  }
}

/**
 * Kills every child on process exit, on SIGINT/SIGTERM/SIGHUP and on an
 * uncaught error; onAbort runs first (stop the load generator, remove temp files).
 */
export function installCleanup (onAbort) {
  process.on('exit', killAllNow)
  const abort = (why, code) => {
    process.stderr.write(`\nbench: ${why}; stopping every child process\n`)
    try { onAbort() } catch {}
    killAllNow()
    process.exit(code)
  }
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.on(sig, () => abort(`received ${sig}`, 130))
  process.on('uncaughtException', (err) => abort(`error: ${err.stack ?? err}`, 1))
  process.on('unhandledRejection', (err) => abort(`error: ${err?.stack ?? err}`, 1))
}
