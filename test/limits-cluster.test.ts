// Rate limits on a real Redis Cluster (REDIS_CLUSTER_NODES): 3 `redis-server --cluster-enabled yes` masters started by
// this test on free loopback ports and joined with `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`.
// Two gateways on the cluster with one prefix enforce exactly one budget per user; counters of different users land on
// different nodes (one key per user per window, so no cross-slot script); the auth-failure limit and WebSocket upgrades
// count there too. Nothing here touches the shared Redis on 6379.
import type { IncomingMessage } from 'node:http'
import t, { type Test } from 'tap'
import WebSocket from 'ws'
import { Redis } from 'ioredis'
import { randomSub } from './helpers/issuer.js'
import { startBackends, startGateway, untilReady, type TestGateway } from './helpers/gateway.js'
import { deleteKeys, keyPrefix, scanKeys, startRedisCluster } from './helpers/redis.js'
import { until } from './helpers/wait.js'

const [{ issuer, upstream }, cluster] = await Promise.all([startBackends(t), startRedisCluster(3)])
t.teardown(() => cluster.stop())
/** One plain client per cluster node, for SCAN (a cluster SCAN is per node). */
const nodeClients = cluster.nodes.map((n) => new Redis(n.port, '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 1 }))
t.teardown(() => { for (const c of nodeClients) c.disconnect() })
await Promise.all(nodeClients.map((c) => c.connect()))

async function gateway (tt: Test, prefix: string, env: Record<string, string>, seeds = cluster.seeds): Promise<TestGateway> {
  const g = await startGateway(tt, issuer, upstream, { env: { REDIS_CLUSTER_NODES: seeds, RATE_LIMIT_KEY_PREFIX: prefix, ...env } })
  await untilReady(g, 10_000, 'gateway ready on the cluster')
  return g
}

/** Keys under `prefix` per node. */
async function keysByNode (prefix: string): Promise<string[][]> {
  return await Promise.all(nodeClients.map((c) => scanKeys(c, prefix)))
}

function cleanup (tt: Test, prefix: string): void {
  tt.teardown(async () => { for (const c of nodeClients) await deleteKeys(c, prefix) })
}

async function status (base: string, path: string, token: string, headers: Record<string, string> = {}): Promise<number> {
  const res = await fetch(base + path, { headers: { authorization: `Bearer ${token}`, ...headers }, signal: AbortSignal.timeout(10_000) })
  await res.arrayBuffer()
  return res.status
}

t.test('the test cluster is a real 3-master Redis Cluster', async (t) => {
  const info = await nodeClients[0]?.cluster('INFO') as string
  t.match(info, /cluster_state:ok/)
  t.match(info, /cluster_known_nodes:3/)
  t.match(info, /cluster_size:3/, 'three masters owning slots')
})

t.test('two gateways on one Redis Cluster enforce exactly one budget per user', async (t) => {
  const prefix = keyPrefix()
  cleanup(t, prefix)
  const MAX = 10
  const env = { RATE_LIMIT_MAX: String(MAX), RATE_LIMIT_WINDOW: '60s' }
  // each gateway is seeded with a different single node: it discovers the rest of the cluster
  const [n0, n1] = cluster.seeds.split(',')
  const g1 = await gateway(t, prefix, env, n0)
  const g2 = await gateway(t, prefix, env, n1)

  const subs = Array.from({ length: 4 }, (_, i) => randomSub(`c${i}`))
  const [warm, ...tokens] = await Promise.all([randomSub('warm'), ...subs].map((sub) => issuer.token({ sub })))
  // warm-up (JIT, cluster slot map, connection pools) so cold-start stalls do not hit the 500 ms command timeout
  for (const g of [g1, g2]) await Promise.all(Array.from({ length: 20 }, () => status(g.url, '/api/warm', warm as string)))
  const path = `/api/${randomSub('cluster')}`
  // hammer: every user sends 2 * MAX requests, alternating gateways, all concurrently
  const results = await Promise.all(tokens.flatMap((token, u) => Array.from({ length: MAX * 2 }, (_, i) =>
    status(i % 2 === 0 ? g1.url : g2.url, `${path}?u=${u}&i=${i}`, token).then((s) => ({ u, s })))))
  for (let u = 0; u < subs.length; u++) {
    const mine = results.filter((r) => r.u === u)
    t.equal(mine.filter((r) => r.s === 200).length, MAX, `user ${u}: exactly ${MAX} allowed across both gateways`)
    t.equal(mine.filter((r) => r.s === 429).length, MAX, `user ${u}: the rest got 429`)
  }
  t.equal(upstream.requests.filter((r) => r.url.startsWith(path)).length, MAX * subs.length, 'the app saw only the allowed requests')

  // a dozen more users, one request each: their counters must spread over the nodes (slots differ per user)
  const spread = await Promise.all(Array.from({ length: 12 }, (_, i) => issuer.token({ sub: randomSub(`s${i}`) })))
  for (const [i, token] of spread.entries()) t.equal(await status(i % 2 === 0 ? g1.url : g2.url, '/api/spread', token), 200)
  const perNode = await keysByNode(prefix)
  t.comment(`keys per node: ${perNode.map((k) => k.length).join(', ')}`)
  const storeErrors = await Promise.all([g1, g2].map(async (g) => {
    const text = await (await fetch(`${g.adminUrl}/metrics`, { signal: AbortSignal.timeout(5000) })).text()
    return Number(/^resonance_rate_limit_store_errors_total (\S+)$/m.exec(text)?.[1])
  }))
  t.same(storeErrors, [0, 0], 'no store errors (no CROSSSLOT, no MOVED trouble, no timeouts)')
  for (const sub of subs) {
    const holders = perNode.filter((keys) => keys.some((k) => k.includes(sub)))
    t.equal(holders.length, 1, `user ${sub}: one counter, on one node`)
  }
  t.ok(perNode.filter((keys) => keys.length > 0).length >= 2, 'counters are spread over several nodes (keys hash to different slots)')
  for (const keys of perNode) for (const k of keys) t.ok(k.startsWith(prefix), `key ${k} carries the prefix`)
})

t.test('on the cluster: GET, POST and WebSocket upgrades share the budget; the window resets', async (t) => {
  const prefix = keyPrefix()
  cleanup(t, prefix)
  const g = await gateway(t, prefix, { RATE_LIMIT_MAX: '3', RATE_LIMIT_WINDOW: '1s' })
  const token = await issuer.token({ sub: randomSub('mixed') })
  t.equal(await status(g.url, '/api/a', token), 200)
  const post = await fetch(`${g.url}/api/b`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain' }, body: 'x', signal: AbortSignal.timeout(5000) })
  await post.arrayBuffer()
  t.equal(post.status, 200)
  t.equal(post.headers.get('x-ratelimit-remaining'), '1', 'POST counted with GET')
  const refusedOrOpen = async (): Promise<number> => await new Promise((resolve, reject) => {
    const ws = new WebSocket(`${g.wsUrl}/ws/c`, { headers: { authorization: `Bearer ${token}` }, handshakeTimeout: 5000 })
    t.teardown(() => ws.terminate())
    ws.once('open', () => { ws.close(); resolve(101) })
    ws.once('unexpected-response', (_req, res: IncomingMessage) => { res.resume(); ws.on('error', () => {}); resolve(res.statusCode ?? 0) })
    ws.once('error', reject)
  })
  t.equal(await refusedOrOpen(), 101, 'upgrade 3/3 allowed')
  t.equal(await refusedOrOpen(), 429, 'upgrade over the budget: 429')
  t.equal(await status(g.url, '/api/a', token), 429, 'GET over the budget: 429')
  t.ok(g.audits().some((l) => l.event === 'rate_limited' && l.transport === 'ws'), 'ws 429 audited with transport ws')
  let first: Response | undefined
  await until(async () => {
    first = await fetch(`${g.url}/api/a`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(10_000) })
    await first.arrayBuffer()
    return first.status === 200
  }, 3000, 'the 1 s window resets on the cluster', 50)
  t.equal(first?.headers.get('x-ratelimit-remaining'), '2', 'window reset: the first request of the new window leaves 2 of 3')
})

t.test('the auth-failure limit counts on the cluster too', async (t) => {
  const prefix = keyPrefix()
  cleanup(t, prefix)
  const env = { AUTH_FAILURE_LIMIT_MAX: '5', AUTH_FAILURE_LIMIT_WINDOW: '30s', TRUST_PROXY: '127.0.0.1' }
  const g1 = await gateway(t, prefix, env)
  const g2 = await gateway(t, prefix, env)
  const ip = '198.51.100.77'
  const from = { 'x-forwarded-for': ip }
  const counted = async (n: number): Promise<void> => await until(async () => {
    for (const c of nodeClients) {
      const key = (await scanKeys(c, prefix)).find((k) => k.includes('fail') && k.endsWith(ip))
      if (key !== undefined) return Number(await c.get(key)) >= n
    }
    return false
  }, 2000, `${n} failures counted in the cluster`, 50)
  // failures spread over both gateways add up in the cluster (each counted before the next, see limits.test.ts)
  for (let i = 0; i < 5; i++) {
    t.equal(await status(i % 2 === 0 ? g1.url : g2.url, '/api/x', `bad.${i}.token`, from), 401, `failure ${i + 1}/5 (gateway ${(i % 2) + 1})`)
    await counted(i + 1)
  }
  // gateway 1 got the answer "5 of 5" for its last failure: it must block that IP now
  t.equal(await status(g1.url, '/api/x', 'bad.6.token', from), 429, 'gateway 1 (which counted the 5th failure): 429 at once')
  // gateway 2 learns it from its own next count, so it may verify one more (documented per-replica lag), never more
  const g2codes: number[] = []
  for (let i = 0; i < 2; i++) g2codes.push(await status(g2.url, '/api/x', `bad.g2.${i}`, from))
  t.ok(g2codes[1] === 429, `gateway 2 blocks after at most one more verified failure: ${g2codes.join(', ')}`)
  await until(async () => await status(g1.url, '/api/x', 'bad.8.token', from) === 429, 2000, 'blocked on gateway 1', 50)
  const valid = await issuer.token({ sub: randomSub('ok') })
  t.equal(await status(g1.url, '/api/x', valid, from), 200, 'a valid token from the blocked IP is still served (the limit only bounds bad tokens)')
  t.equal(await status(g2.url, '/api/x', valid, from), 200, 'on either gateway')
  t.equal(await status(g1.url, '/api/x', valid, { 'x-forwarded-for': '198.51.100.78' }), 200, 'another IP is served')
  t.ok((await keysByNode(prefix)).flat().some((k) => k.includes('198.51.100.77')), 'the failure counter lives in the cluster under the prefix')
})
