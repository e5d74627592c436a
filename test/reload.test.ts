// Config without restarts: SIGHUP (and the opt-in file watch) apply new limits, rules and public paths to new
// requests, keep open connections, and reject an invalid file while the old config stays in force.
import { writeFileSync } from 'node:fs'
import t from 'tap'
import WebSocket from 'ws'
import { baseEnv, startBackends, startGateway, untilReady, writeYaml } from './helpers/gateway.js'
import { ensureBuilt, spawnGateway } from './helpers/process.js'
import { until } from './helpers/wait.js'

t.test('reload applies new policy to new requests and keeps open WebSockets', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const file = writeYaml('auth:\n  publicPaths: []\nrateLimit:\n  max: 3\n  window: 60s\n')
  const g = await startGateway(t, issuer, upstream, { env: { CONFIG_FILE: file } })
  const auth = { authorization: `Bearer ${await issuer.token({ sub: 'reloader' })}` }

  const ws = new WebSocket(`${g.wsUrl}/ws/resonance`, { headers: auth })
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject) })
  // The upgrade took 1 of the 3 requests.
  const statuses: number[] = []
  for (let i = 0; i < 3; i++) statuses.push((await fetch(`${g.url}/x`, { headers: auth })).status)
  t.same(statuses, [200, 200, 429], 'old budget: 3 per window')
  t.equal((await fetch(`${g.url}/public/info`)).status, 401, 'not public yet')

  writeFileSync(file, 'auth:\n  publicPaths: [/public/**]\nrateLimit:\n  max: 10\n  window: 60s\n  routes:\n    - path: /limited\n      max: 1\n')
  const result = g.gw.reload()
  t.same(result, { ok: true, restartNeeded: [] })
  t.equal((await fetch(`${g.url}/x`, { headers: auth })).status, 200, 'new budget applies to new requests')
  t.equal((await fetch(`${g.url}/public/info`)).status, 200, 'new public path served without a token')
  t.equal((await fetch(`${g.url}/limited`, { headers: auth })).status, 200)
  t.equal((await fetch(`${g.url}/limited`, { headers: auth })).status, 429, 'new route rule applies')

  t.equal(ws.readyState, WebSocket.OPEN, 'the open WebSocket survived the reload')
  ws.send('still here')
  const echo = await new Promise<string>((resolve) => ws.once('message', (d) => resolve(String(d))))
  t.equal(echo, 'still here')

  writeFileSync(file, 'rateLimit:\n  max: -5\n  bogus: 1\n')
  const bad = g.gw.reload()
  t.equal(bad.ok, false)
  t.match(bad.error, /rateLimit\.max \(RATE_LIMIT_MAX\)/)
  t.match(bad.error, /rateLimit\.bogus: unknown key/)
  const rejected = g.logs().filter((l) => l.msg === 'config reload rejected: keeping the configuration in force')
  t.equal(rejected.length, 1, 'one clear log line')
  t.equal((await fetch(`${g.url}/public/info`)).status, 200, 'the old (last good) config stays in force')

  writeFileSync(file, 'upstream:\n  connections: 7\nrateLimit:\n  max: 10\n')
  const fixed = g.gw.reload()
  t.equal(fixed.ok, true)
  t.same(fixed.restartNeeded, ['upstream.connections'], 'upstream changes are reported as needing a restart')
  t.equal(g.gw.live.current.upstream.connections, 128, 'and keep their old value')
  ws.close()
})

t.test('CONFIG_WATCH=true reloads when the file changes', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const file = writeYaml('auth:\n  publicPaths: []\n')
  const g = await startGateway(t, issuer, upstream, { env: { CONFIG_FILE: file, CONFIG_WATCH: 'true' } })
  t.equal((await fetch(`${g.url}/open/x`)).status, 401)
  writeFileSync(file, 'auth:\n  publicPaths: [/open/**]\n')
  await until(async () => (await fetch(`${g.url}/open/x`)).status === 200, 5000, '/open/x public after the edit', 25)
  t.equal((await fetch(`${g.url}/open/x`)).status, 200, 'the edit applied without a signal: /open/x is public')
})

t.test('SIGHUP reloads a running gateway process', async (t) => {
  ensureBuilt()
  const { issuer, upstream } = await startBackends(t)
  const file = writeYaml('auth:\n  publicPaths: []\n')
  const p = spawnGateway(t, { ...baseEnv(issuer, upstream), CONFIG_FILE: file })
  const { url, adminUrl } = await p.listening()
  await untilReady({ adminUrl }, 10_000, 'the spawned gateway answers /readyz 200')
  t.equal((await fetch(`${url}/open/x`)).status, 401)
  writeFileSync(file, 'auth:\n  publicPaths: [/open/**]\n')
  p.child.kill('SIGHUP')
  await until(async () => (await fetch(`${url}/open/x`)).status === 200, 5000, '/open/x public after the reload', 25)
  t.match(p.stdout(), /"msg":"config reloaded"/)
  t.equal(p.child.exitCode, null, 'still running')
})
