// Requests before any load: each proves that its path works, and that auth
// and the per-user limit are really on or off where the row says so.
import { describeTail } from '../lib/children.mjs'
import { redisCommandsProcessed } from '../lib/redis.mjs'
import { REQUEST_PATH } from '../lib/setup.mjs'
import { closeAll, openIdle, openWs } from '../lib/ws-load.mjs'
import { WS_PATH } from '../settings.mjs'

/** Requests before any load: proves the path works (and that auth and the limit are really on or off). */
export async function preflight (subject, run, tokens) {
  const t = tokens[0]
  const res = await fetch(`${run.url}${REQUEST_PATH}preflight`, { headers: { authorization: `Bearer ${t.jwt}` } })
  const body = await res.text()
  const fail = (why) => { throw new Error(`preflight ${subject.name}: ${why}\n${run.child ? describeTail(run.child) : ''}`) }
  if (res.status !== 200) fail(`expected 200 with a valid token, got ${res.status} ${body.slice(0, 300)}`)
  let json
  try { json = JSON.parse(body) } catch { fail(`the answer is not the app's JSON: ${body.slice(0, 300)}`) }
  if (json.ok !== true) fail(`the answer is not the app's JSON: ${body.slice(0, 300)}`)
  if (subject.auth) {
    if (json.user !== t.sub) fail(`the app did not receive the identity (x-user-sub = ${json.user}, expected ${t.sub})`)
    const anon = await fetch(`${run.url}${REQUEST_PATH}preflight`)
    await anon.arrayBuffer()
    if (anon.status !== 401) fail(`expected 401 without a token, got ${anon.status}: auth is not on`)
  }
  const limit = res.headers.get('x-ratelimit-limit')
  if (subject.limitHeaders === true && limit === null) fail('no X-RateLimit-Limit header: the per-user rate limit is not applied')
  if (subject.limitHeaders === false && limit !== null) fail(`X-RateLimit-Limit: ${limit}: the caller is not exempt from the rate limit`)
  if (run.redis) {
    // 20 requests must reach Redis (at least one command each), or REDIS_URL is silently not in use.
    const before = await redisCommandsProcessed(run.redis.port)
    for (let i = 0; i < 20; i++) await (await fetch(`${run.url}${REQUEST_PATH}preflight`, { headers: { authorization: `Bearer ${t.jwt}` } })).arrayBuffer()
    const after = await redisCommandsProcessed(run.redis.port)
    if (!(after - before >= 20)) fail(`the private Redis saw ${after - before} commands for 20 requests: the limit store is not Redis`)
  }
  return Buffer.byteLength(body)
}

export function wsUrlFor (run, auth, tokens) {
  const base = run.url.replace(/^http/, 'ws') + WS_PATH
  return auth ? (i) => `${base}?access_token=${tokens[i % tokens.length].jwt}` : () => base
}

/** One WebSocket connection with one echo; with auth, an upgrade without a token must get 401. */
export async function wsPreflight (subject, run, tokens, { checkAnon = true } = {}) {
  const fail = (why) => { throw new Error(`WebSocket preflight ${subject.name}: ${why}\n${run.child ? describeTail(run.child) : ''}`) }
  const r = await openIdle(wsUrlFor(run, subject.auth, tokens), 1, { payload: 'preflight' })
  if (r.sockets.length !== 1) fail(`could not open a connection and get an echo: ${[...r.failures.keys()].join(', ')}`)
  await closeAll(r.sockets)
  if (subject.auth && checkAnon) {
    try {
      const ws = await openWs(run.url.replace(/^http/, 'ws') + WS_PATH)
      await closeAll([ws])
      fail('an upgrade without a token was accepted: auth is not on')
    } catch (err) {
      if (err.reason !== 'HTTP 401') throw err.reason ? new Error(`WebSocket preflight ${subject.name}: expected 401 without a token, got ${err.reason}`) : err
    }
  }
}
