// WebSocket load, run in the bench runner (pinned to the load-generator CPU)
// with the `ws` client (permessage-deflate off, as the gateway and the app have it):
//   echoRun  - N connections, each doing echo round trips back to back
//              (send, wait for the echo, send again): round trips/s and
//              per-round-trip latency, closed loop, like autocannon for HTTP;
//   openIdle - open N connections in batches, one echo each to prove the path
//              works end to end, then leave them idle (memory per connection).
import WebSocket from 'ws'

const CLIENT_OPTS = { perMessageDeflate: false, handshakeTimeout: 10_000, maxPayload: 1024 * 1024 }

/** Opens one client; rejects with a short reason ("HTTP 429", "ECONNRESET", ...). */
export function openWs (url, protocols) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocols ?? [], CLIENT_OPTS)
    let settled = false
    const fail = (why) => {
      if (settled) return
      settled = true
      ws.removeAllListeners()
      ws.on('error', () => {})
      ws.terminate()
      reject(Object.assign(new Error(why), { reason: why }))
    }
    ws.once('unexpected-response', (_req, res) => {
      res.resume()
      fail(`HTTP ${res.statusCode}`)
    })
    ws.once('error', (err) => fail(err.code ?? err.message))
    ws.once('close', (code) => fail(`closed ${code} before open`))
    ws.once('open', () => {
      if (settled) return
      settled = true
      ws.removeAllListeners()
      resolve(ws)
    })
  })
}

/** Sends one message and waits for its echo. */
function echoOnce (ws, payload, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { cleanup(); reject(Object.assign(new Error('echo timeout'), { reason: 'echo timeout' })) }, timeoutMs)
    const onMessage = (data) => {
      cleanup()
      if (data.length !== Buffer.byteLength(payload)) reject(Object.assign(new Error('echo mismatch'), { reason: `echo of ${data.length} bytes, sent ${Buffer.byteLength(payload)}` }))
      else resolve()
    }
    const onClose = (code) => { cleanup(); reject(Object.assign(new Error('closed'), { reason: `closed ${code} before the echo` })) }
    const cleanup = () => { clearTimeout(timer); ws.off('message', onMessage); ws.off('close', onClose) }
    ws.on('message', onMessage)
    ws.on('close', onClose)
    ws.send(payload)
  })
}

/** Closes every socket (normal close, then terminate after timeoutMs). */
export async function closeAll (sockets, timeoutMs = 3_000) {
  await Promise.all(sockets.map((ws) => new Promise((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) return resolve()
    ws.benchClosing = true
    const timer = setTimeout(() => { ws.terminate(); resolve() }, timeoutMs)
    ws.once('close', () => { clearTimeout(timer); resolve() })
    ws.on('error', () => {})
    try { ws.close(1000, 'bench done') } catch { ws.terminate() }
  })))
}

function countReason (map, reason) {
  map.set(reason, (map.get(reason) ?? 0) + 1)
}

/**
 * Opens `n` connections (urlFor(i) gives each its URL, e.g. with its own
 * token), `batch` handshakes at a time, each followed by one echo. Returns the
 * open sockets and the failures by reason; sockets that close later are
 * counted in `closedEarly` (a Map by close code).
 */
export async function openIdle (urlFor, n, { batch = 200, payload = 'hello' } = {}) {
  const sockets = []
  const failures = new Map()
  const closedEarly = new Map()
  const t0 = performance.now()
  for (let start = 0; start < n; start += batch) {
    const end = Math.min(n, start + batch)
    await Promise.all(Array.from({ length: end - start }, async (_x, j) => {
      let ws
      try {
        ws = await openWs(urlFor(start + j))
        ws.on('error', () => {})
        await echoOnce(ws, payload)
        ws.on('close', (code) => { if (!ws.benchClosing) countReason(closedEarly, `closed ${code}`) })
        sockets.push(ws)
      } catch (err) {
        countReason(failures, err.reason ?? err.message)
        ws?.terminate()
      }
    }))
  }
  return { sockets, failures, closedEarly, seconds: (performance.now() - t0) / 1000 }
}

/**
 * Echo load: opens `connections` sockets, then each one sends `payload`, waits
 * for the echo and sends again, for warmupS (discarded) then measureS seconds.
 * hooks.start()/hooks.end() run synchronously at the edges of the measured
 * window (read CPU counters there). Round trips completed inside the window
 * are counted and their latencies recorded in `latencies` (an object with add(ms)).
 */
export async function echoRun (urlFor, connections, { warmupS, measureS, payload, latencies, hooks = {} }) {
  const opened = await Promise.allSettled(Array.from({ length: connections }, (_x, i) => openWs(urlFor(i))))
  const failed = opened.filter((o) => o.status === 'rejected')
  const sockets = opened.filter((o) => o.status === 'fulfilled').map((o) => o.value)
  if (failed.length > 0) {
    await closeAll(sockets)
    const reasons = new Map()
    for (const f of failed) countReason(reasons, f.reason.reason ?? f.reason.message)
    throw new Error(`${failed.length} of ${connections} WebSocket connections failed to open: ${[...reasons].map(([r, c]) => `${r} ×${c}`).join(', ')}`)
  }
  const bytes = Buffer.byteLength(payload)
  const state = { measuring: false, stopped: false, count: 0, mismatches: 0, errors: new Map() }
  const idle = sockets.map((ws) => new Promise((resolve) => {
    let sentAt = 0
    const send = () => { sentAt = performance.now(); ws.send(payload) }
    ws.on('message', (data) => {
      if (state.measuring) {
        latencies.add(performance.now() - sentAt)
        state.count++
      }
      if (data.length !== bytes) state.mismatches++
      if (state.stopped) resolve()
      else send()
    })
    ws.on('error', (err) => countReason(state.errors, err.code ?? err.message))
    ws.on('close', (code) => {
      if (!state.stopped) countReason(state.errors, `closed ${code}`)
      resolve()
    })
    send()
  }))
  await new Promise((resolve) => setTimeout(resolve, warmupS * 1000))
  hooks.start?.()
  const t0 = performance.now()
  state.measuring = true
  await new Promise((resolve) => setTimeout(resolve, measureS * 1000))
  state.measuring = false
  const seconds = (performance.now() - t0) / 1000
  hooks.end?.()
  state.stopped = true
  // Every connection has one round trip in flight; let it land (bounded), then close.
  await Promise.race([Promise.all(idle), new Promise((resolve) => setTimeout(resolve, 3_000))])
  await closeAll(sockets)
  return { roundTrips: state.count, seconds, mismatches: state.mismatches, errors: state.errors }
}
