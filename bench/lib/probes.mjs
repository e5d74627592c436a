// What the runner reads from its children besides CPU: gateway metrics and
// /readyz, memory after a forced GC, the log lines a child wrote.
import { rssKiB } from './children.mjs'

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** A metric's value from the admin /metrics (summed over label sets), or undefined. */
export async function metricValue (adminUrl, name) {
  try {
    const text = await (await fetch(`${adminUrl}/metrics`, { signal: AbortSignal.timeout(2000) })).text()
    let sum
    for (const line of text.split('\n')) {
      if (line.startsWith(name + ' ') || line.startsWith(name + '{')) sum = (sum ?? 0) + Number(line.slice(line.lastIndexOf(' ') + 1))
    }
    return sum
  } catch {
    return undefined
  }
}

export async function readyzStatus (adminUrl) {
  try {
    const res = await fetch(`${adminUrl}/readyz`, { signal: AbortSignal.timeout(1000) })
    await res.arrayBuffer()
    return res.status
  } catch (err) {
    return err.cause?.code ?? err.name
  }
}

/** Asks a process started with memArgv() for a GC and its memory; RSS from /proc after the GC. */
export function memProbe (child, timeoutMs = 5_000) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => { child.lineListeners.delete(listen); resolve({ rssKiB: rssKiB(child.pid), gc: false, probe: 'no answer' }) }, timeoutMs)
    const listen = (line) => {
      if (!line.startsWith('{"benchMem"')) return
      clearTimeout(timer)
      child.lineListeners.delete(listen)
      const m = JSON.parse(line).benchMem
      resolve({ rssKiB: rssKiB(child.pid), heapUsed: m.heapUsed, external: m.external, arrayBuffers: m.arrayBuffers, gc: m.gc })
    }
    child.lineListeners.add(listen)
    try { child.kill('SIGUSR2') } catch {}
  })
}

/** The stdout lines a child logged during the run, summarised by message. */
export function logSummary (child) {
  const counts = new Map()
  for (const line of child.lines) {
    let msg = line.slice(0, 120)
    try { const j = JSON.parse(line); msg = `${j.level >= 50 ? 'error' : j.level >= 40 ? 'warn' : 'info'}: ${j.msg}` } catch {}
    counts.set(msg, (counts.get(msg) ?? 0) + 1)
  }
  return [...counts].map(([m, c]) => `"${m}" ×${c}`).join('; ')
}
