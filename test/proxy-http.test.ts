// HTTP forwarding through real sockets: what the app receives (method, body, query, headers), what the client gets
// back (status, body, headers), streaming of large bodies both ways, and 502/504 when the app fails.
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import { startBackends, startGateway } from './helpers/gateway.js'

t.test('HTTP proxying', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream)
  const token = await issuer.token({ sub: 'alice', realmRoles: ['user', 'premium'], username: 'alice.w' })
  const auth = { authorization: `Bearer ${token}` }

  t.beforeEach(() => upstream.reset())

  t.test('method, body and query reach the app intact; status and body come back', async (t) => {
    for (const method of ['POST', 'PUT', 'PATCH', 'DELETE']) {
      upstream.reset()
      const body = JSON.stringify({ entry: 'résonance', n: 42, method })
      const res = await fetch(`${g.url}/echo?x=1&y=a%20b&y=2`, {
        method,
        headers: { ...auth, 'content-type': 'application/json' },
        body
      })
      t.equal(res.status, 200, method)
      t.equal(await res.text(), body, `${method} body echoed byte for byte`)
      const seen = upstream.requests[0]
      t.equal(seen?.method, method)
      t.equal(seen?.url, '/echo?x=1&y=a%20b&y=2')
      t.equal(seen?.body.toString('utf8'), body)
    }
    const created = await fetch(`${g.url}/status/201`, { method: 'POST', headers: auth })
    t.equal(created.status, 201)
    const teapot = await fetch(`${g.url}/status/418`, { headers: auth })
    t.equal(teapot.status, 418, 'app statuses pass through, 4xx included')
    const redirect = await fetch(`${g.url}/redirect`, { headers: auth, redirect: 'manual' })
    t.equal(redirect.status, 302)
    t.equal(redirect.headers.get('location'), '/somewhere')
  })

  t.test('identity headers: client-supplied X-User-* stripped, verified identity injected', async (t) => {
    const res = await fetch(`${g.url}/api/resonance/entries`, {
      headers: {
        ...auth,
        'x-user-sub': 'admin',
        'X-User-Roles': 'admin',
        'x-user-email': 'root@example.com',
        'x-request-id': 'trace-123'
      }
    })
    t.equal(res.status, 200)
    t.equal(res.headers.get('x-request-id'), 'trace-123', 'a sane caller request id is kept and returned')
    const h = upstream.requests[0]?.headers ?? {}
    t.equal(h['x-user-sub'], 'alice')
    t.equal(h['x-user-roles'], 'user,premium')
    t.equal(h['x-user-name'], 'alice.w')
    t.equal(h['x-user-email'], undefined, 'unknown X-User-* headers are stripped too')
    t.equal(h.authorization, undefined, 'the token is not forwarded by default')
    t.equal(h['x-forwarded-for'], '127.0.0.1')
    t.equal(h['x-forwarded-proto'], 'http')
    t.equal(h['x-request-id'], 'trace-123')
  })

  t.test('a hostile request id is replaced', async (t) => {
    const res = await fetch(`${g.url}/x`, { headers: { ...auth, 'x-request-id': 'a b"c' } })
    t.not(res.headers.get('x-request-id'), 'a b"c')
    t.match(res.headers.get('x-request-id'), /^[0-9a-f]{16}-[0-9a-z]+$/, 'a fresh id: per-process random prefix and a counter')
  })

  t.test('access_token query parameter never reaches the app', async (t) => {
    const res = await fetch(`${g.url}/api/resonance/x?a=1&access_token=${token}&b=2`, { headers: auth })
    t.equal(res.status, 200)
    t.equal(upstream.requests[0]?.url, '/api/resonance/x?a=1&b=2')
    await fetch(`${g.url}/api/resonance/x?access_token=${token}`, { headers: auth })
    t.equal(upstream.requests[1]?.url, '/api/resonance/x')
  })

  t.test('large bodies stream both ways', async (t) => {
    const size = 32 * 1024 * 1024
    const down = await fetch(`${g.url}/big?bytes=${size}`, { headers: auth })
    t.equal(down.status, 200)
    let received = 0
    for await (const chunk of down.body as unknown as AsyncIterable<Uint8Array>) received += chunk.length
    t.equal(received, size, '32 MiB downloaded')

    const up = Buffer.alloc(size, 0x61)
    const res = await fetch(`${g.url}/upload`, { method: 'POST', headers: { ...auth, 'content-type': 'application/octet-stream' }, body: up })
    t.equal(res.status, 200)
    const echoed = await res.json() as { bodyLength: number }
    t.equal(echoed.bodyLength, size, '32 MiB uploaded (no body limit on the proxied stream)')
  })

  t.test('metrics count proxied requests by status class', async (t) => {
    const text = await (await fetch(`${g.adminUrl}/metrics`)).text()
    t.match(text, /resonance_http_requests_total\{status_class="2xx"\} [1-9]/)
    t.match(text, /resonance_http_request_duration_seconds_bucket\{le="0.005",status_class="2xx"\}/)
  })
})

t.test('upstream failures: 502 when down, 504 when slow, fast and JSON', async (t) => {
  const { issuer, upstream } = await startBackends(t)

  // A port with nothing listening: bind, note it, close.
  const closed = createServer()
  await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve))
  const deadPort = (closed.address() as AddressInfo).port
  await new Promise((resolve) => closed.close(resolve))

  const down = await startGateway(t, issuer, upstream, { env: { UPSTREAM_URL: `http://127.0.0.1:${deadPort}` } })
  const slow = await startGateway(t, issuer, upstream, { env: { UPSTREAM_TIMEOUT: '300ms' } })
  const auth = { authorization: `Bearer ${await issuer.token()}` }

  let started = performance.now()
  let res = await fetch(`${down.url}/api/resonance/x`, { headers: auth })
  t.equal(res.status, 502)
  t.ok(performance.now() - started < 2000, 'refused connection answers at once')
  t.same(await res.json(), { error: 'bad_gateway', error_description: 'The app is unavailable' })

  started = performance.now()
  res = await fetch(`${slow.url}/slow?ms=3000`, { headers: auth })
  t.equal(res.status, 504)
  t.ok(performance.now() - started < 2500, 'timeout fires near UPSTREAM_TIMEOUT')
  const body = await res.text()
  t.notMatch(body, /at .*\.js|Error:/, 'no stack trace or internals in the body')

  const metrics = await (await fetch(`${down.adminUrl}/metrics`)).text()
  t.match(metrics, /resonance_upstream_errors_total\{kind="connect",transport="http"\} 1/)
  const slowMetrics = await (await fetch(`${slow.adminUrl}/metrics`)).text()
  t.match(slowMetrics, /resonance_upstream_errors_total\{kind="timeout",transport="http"\} 1/)
})

// Answers up to BUFFER_MAX_BYTES with a Content-Length are read whole and sent as one buffer; the rest streams.
// Both paths must give the client exactly what the app sent, and an app that breaks off mid-body must not leak
// half an answer (or its headers) to the client.
t.test('answer bodies: buffered when small and sized, streamed otherwise, 502 on a broken-off body', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const bytes = (n: number): Buffer => Buffer.from(Array.from({ length: n }, (_v, i) => i % 251))
  const app = createServer((req, res) => {
    const n = Number(new URL(req.url ?? '/', 'http://x').searchParams.get('n') ?? 0)
    if (req.url?.startsWith('/sized')) {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': n, 'x-app': 'yes' }).end(bytes(n))
    } else if (req.url?.startsWith('/chunked')) {
      res.writeHead(200, { 'content-type': 'application/octet-stream' })
      const b = bytes(n)
      res.write(b.subarray(0, n >> 1))
      setTimeout(() => res.end(b.subarray(n >> 1)), 20)
    } else if (req.url?.startsWith('/truncated')) {
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': 1000, 'set-cookie': 'session=app' })
      res.write('only ten b')
      setTimeout(() => res.socket?.destroy(), 20)
    } else {
      res.writeHead(204).end()
    }
  })
  await new Promise<void>((resolve) => app.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise((resolve) => app.close(resolve)))
  const g = await startGateway(t, issuer, upstream, { env: { UPSTREAM_URL: `http://127.0.0.1:${(app.address() as AddressInfo).port}` } })
  const auth = { authorization: `Bearer ${await issuer.token()}` }

  for (const n of [0, 1, 5000, 16 * 1024, 16 * 1024 + 1, 300 * 1024]) {
    for (const kind of ['sized', 'chunked']) {
      const res = await fetch(`${g.url}/${kind}?n=${n}`, { headers: auth })
      t.equal(res.status, 200, `${kind} ${n}: 200`)
      const body = Buffer.from(await res.arrayBuffer())
      t.ok(body.equals(bytes(n)), `${kind} ${n}: the body arrives byte for byte`)
      if (kind === 'sized') {
        t.equal(res.headers.get('content-length'), String(n), `sized ${n}: the app's Content-Length`)
        t.equal(res.headers.get('x-app'), 'yes', `sized ${n}: the app's headers`)
      }
    }
  }
  const head = await fetch(`${g.url}/sized?n=100`, { method: 'HEAD', headers: auth })
  t.equal(head.status, 200)
  t.equal((await head.arrayBuffer()).byteLength, 0, 'HEAD: no body')
  const empty = await fetch(`${g.url}/nothing`, { headers: auth })
  t.equal(empty.status, 204)

  const broken = await fetch(`${g.url}/truncated`, { headers: auth })
  t.equal(broken.status, 502, 'an answer broken off mid-body: 502, not half a body')
  t.same(await broken.json(), { error: 'bad_gateway', error_description: 'The app is unavailable' })
  t.equal(broken.headers.get('set-cookie'), null, 'none of the app\'s headers leak onto the 502')
  t.match(await (await fetch(`${g.adminUrl}/metrics`)).text(), /resonance_upstream_errors_total\{kind="reset",transport="http"\} 1/)
})
