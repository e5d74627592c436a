// Proves the test helpers do what the other tests rely on: a Keycloak-shaped issuer, attack-token forging, and a
// recording HTTP + WebSocket upstream.
import { createHmac } from 'node:crypto'
import { once } from 'node:events'
import t from 'tap'
import {
  createRemoteJWKSet,
  decodeJwt,
  decodeProtectedHeader,
  exportJWK,
  generateKeyPair,
  importJWK,
  jwtVerify,
  base64url,
  type JSONWebKeySet
} from 'jose'
import WebSocket from 'ws'
import { startIssuer, type TestIssuer } from './helpers/issuer.js'
import { claims, foreignRsaKey, forgeToken } from './helpers/forge.js'
import { until } from './helpers/wait.js'
import { startUpstream } from './helpers/upstream.js'

async function getJson<T> (url: string): Promise<T> {
  const res = await fetch(url)
  if (!res.ok) throw new Error(`${url} answered ${res.status}`)
  return await res.json() as T
}

async function jwksKids (issuer: TestIssuer): Promise<string[]> {
  const { keys } = await getJson<JSONWebKeySet>(issuer.jwksUrl)
  return keys.map((k) => k.kid ?? '')
}

t.test('issuer: discovery is shaped like a Keycloak realm', async (t) => {
  const issuer = await startIssuer({ realm: 'demo' })
  t.teardown(() => issuer.close())

  t.match(issuer.issuer, /^http:\/\/127\.0\.0\.1:\d+\/realms\/demo$/)
  t.equal(issuer.jwksUrl, `${issuer.issuer}/protocol/openid-connect/certs`)
  t.equal(issuer.audience, 'resonance-gateway')

  const doc = await getJson<Record<string, unknown>>(`${issuer.issuer}/.well-known/openid-configuration`)
  t.equal(doc.issuer, issuer.issuer)
  t.equal(doc.jwks_uri, issuer.jwksUrl)
  t.equal(doc.token_endpoint, `${issuer.issuer}/protocol/openid-connect/token`)
  t.ok((doc.grant_types_supported as string[]).includes('client_credentials'))

  const res = await fetch(`http://127.0.0.1:${new URL(issuer.issuer).port}/realms/other/.well-known/openid-configuration`)
  t.equal(res.status, 404, 'another realm does not exist')
  await res.arrayBuffer()
})

t.test('issuer: tokens are real RS256 access tokens with Keycloak claims', async (t) => {
  const issuer = await startIssuer()
  t.teardown(() => issuer.close())
  const jwks = createRemoteJWKSet(new URL(issuer.jwksUrl))
  const verify = (token: string, audience = issuer.audience) =>
    jwtVerify(token, jwks, { issuer: issuer.issuer, audience, algorithms: ['RS256'] })

  const token = await issuer.token({
    sub: 'alice',
    realmRoles: ['user', 'admin'],
    clientRoles: { 'resonance-gateway': ['reader'], account: ['view-profile'] },
    username: 'Alice'
  })
  const { payload, protectedHeader } = await verify(token)
  t.same(protectedHeader, { alg: 'RS256', typ: 'JWT', kid: issuer.currentKid() })
  t.equal(payload.iss, issuer.issuer)
  t.equal(payload.sub, 'alice')
  t.equal(payload.azp, 'alice')
  t.equal(payload.aud, 'resonance-gateway')
  t.equal(payload.typ, 'Bearer')
  t.equal(payload.preferred_username, 'Alice')
  t.equal(payload.scope, 'profile email')
  t.same(payload.realm_access, { roles: ['user', 'admin'] })
  t.same(payload.resource_access, {
    'resonance-gateway': { roles: ['reader'] },
    account: { roles: ['view-profile'] }
  })
  t.type(payload.jti, 'string')
  t.equal((payload.exp ?? 0) - (payload.iat ?? 0), 300, 'default lifetime is 300 s')

  const bare = decodeJwt(await issuer.token())
  t.equal(bare.sub, 'test-user', 'default sub')
  t.same(bare.realm_access, { roles: [] })
  t.notOk('resource_access' in bare)
  t.notOk('preferred_username' in bare)

  const short = decodeJwt(await issuer.token({ ttlSeconds: 2 }))
  t.equal((short.exp ?? 0) - (short.iat ?? 0), 2, 'ttlSeconds: 2 gives exp - iat == 2')

  const other = await issuer.token({ audience: 'someone-else' })
  t.equal((await verify(other, 'someone-else')).payload.aud, 'someone-else')
  await t.rejects(verify(other), { code: 'ERR_JWT_CLAIM_VALIDATION_FAILED' }, 'wrong audience is a real failure')

  const subs = Array.from({ length: 40 }, (_, i) => `svc.user_${i}-X`)
  const tokens = await Promise.all(subs.map((sub) => issuer.token({ sub })))
  t.same(tokens.map((tok) => decodeJwt(tok).sub), subs, 'any [A-Za-z0-9._-] sub works without registration')

  await t.rejects(issuer.token({ sub: 'not allowed!' }), TypeError)
})

t.test('issuer: rotation, key dropping, failure injection and stats', async (t) => {
  const issuer = await startIssuer()
  t.teardown(() => issuer.close())

  const before = await issuer.token()
  const oldKid = issuer.currentKid()
  const oldPem = issuer.publicKeyPem()
  t.match(oldPem, /^-----BEGIN PUBLIC KEY-----/)

  await issuer.rotate()
  const newKid = issuer.currentKid()
  t.not(newKid, oldKid, 'rotation makes a new kid')
  t.not(issuer.publicKeyPem(), oldPem)
  t.same((await jwksKids(issuer)).sort(), [oldKid, newKid].sort(), 'both kids are published')
  const after = await issuer.token()
  t.equal(decodeProtectedHeader(after).kid, newKid, 'new tokens use the new kid')
  t.equal(decodeProtectedHeader(before).kid, oldKid)
  const jwks = createRemoteJWKSet(new URL(issuer.jwksUrl))
  for (const token of [before, after]) {
    await jwtVerify(token, jwks, { issuer: issuer.issuer, audience: issuer.audience })
  }

  await issuer.dropOldKeys()
  t.same(await jwksKids(issuer), [newKid], 'only the current key is left')
  t.equal(decodeProtectedHeader(await issuer.token()).kid, newKid)

  const discoveryUrl = `${issuer.issuer}/.well-known/openid-configuration`
  const start = { ...issuer.stats }
  await getJson(discoveryUrl)
  await getJson(issuer.jwksUrl)
  await getJson(issuer.jwksUrl)
  await issuer.token()
  t.same(issuer.stats, { discovery: start.discovery + 1, jwks: start.jwks + 2 }, 'stats count discovery and jwks hits')

  issuer.setJwksMode('error')
  for (const url of [discoveryUrl, issuer.jwksUrl]) {
    const res = await fetch(url)
    t.equal(res.status, 500, `error mode: ${url} answers 500`)
    await res.arrayBuffer()
  }
  t.ok(await issuer.token(), 'the token endpoint is not affected')

  issuer.setJwksMode('hang')
  for (const url of [discoveryUrl, issuer.jwksUrl]) {
    const started = Date.now()
    await t.rejects(fetch(url, { signal: AbortSignal.timeout(300) }), { name: 'TimeoutError' }, `hang mode: ${url}`)
    t.ok(Date.now() - started >= 250, 'it really hung')
  }

  issuer.setJwksMode('ok')
  const ok = await fetch(issuer.jwksUrl)
  t.equal(ok.status, 200, 'back to ok')
  await ok.arrayBuffer()
  t.same(issuer.stats, { discovery: start.discovery + 3, jwks: start.jwks + 5 }, 'failed requests are counted too')
})

t.test('issuer: close() works while a request hangs', async (t) => {
  const issuer = await startIssuer()
  issuer.setJwksMode('hang')
  const pending = fetch(issuer.jwksUrl).then(() => 'answered', () => 'failed')
  await until(() => issuer.stats.jwks > 0, 3000, 'the issuer received the JWKS request')
  await issuer.close()
  t.equal(await pending, 'failed', 'the hung request fails once the issuer closes')
})

t.test('forge: attack tokens carry the intended header', async (t) => {
  const issuer = await startIssuer()
  t.teardown(() => issuer.close())
  const payload = claims(issuer, { sub: 'mallory', jti: undefined })
  t.equal(payload.iss, issuer.issuer)
  t.equal(payload.aud, issuer.audience)
  t.equal(payload.typ, 'Bearer')
  t.notOk('jti' in payload, 'undefined deletes a claim')
  t.equal(payload.sub, 'mallory')
  t.equal((payload.exp as number) - (payload.iat as number), 300)

  const none = await forgeToken({ alg: 'none', payload })
  t.same(decodeProtectedHeader(none), { alg: 'none', typ: 'JWT' })
  t.ok(none.endsWith('.'), 'unsigned token has an empty signature')
  t.same(decodeJwt(none), payload)

  const pem = issuer.publicKeyPem()
  const confused = await forgeToken({ alg: 'HS256', key: pem, header: { kid: issuer.currentKid() }, payload })
  t.same(decodeProtectedHeader(confused), { alg: 'HS256', typ: 'JWT', kid: issuer.currentKid() })
  const [h, p, s] = confused.split('.')
  t.equal(s, base64url.encode(createHmac('sha256', pem).update(`${h}.${p}`).digest()), 'HMAC keyed with the PEM bytes')
  await jwtVerify(confused, new TextEncoder().encode(pem), { algorithms: ['HS256'] })

  const emptySecret = await forgeToken({ alg: 'HS256', key: '', payload })
  t.equal(emptySecret.split('.')[2], base64url.encode(createHmac('sha256', '').update(emptySecret.split('.').slice(0, 2).join('.')).digest()))

  const foreign = await foreignRsaKey()
  t.equal(foreign.publicJwk.kty, 'RSA')
  const stolenKid = await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid: issuer.currentKid() }, payload })
  t.equal(decodeProtectedHeader(stolenKid).kid, issuer.currentKid())
  await jwtVerify(stolenKid, await importJWK(foreign.publicJwk, 'RS256'))
  await t.rejects(jwtVerify(stolenKid, createRemoteJWKSet(new URL(issuer.jwksUrl))),
    { code: 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED' }, 'the issuer JWKS rejects a foreign key with a real kid')

  const ec = await generateKeyPair('ES256', { extractable: true })
  const es = await forgeToken({ alg: 'ES256', key: ec.privateKey, payload })
  t.equal(decodeProtectedHeader(es).alg, 'ES256')
  await jwtVerify(es, ec.publicKey)
  const ecJwk = await exportJWK(ec.privateKey)
  await jwtVerify(await forgeToken({ alg: 'ES256', key: ecJwk, payload }), ec.publicKey)

  const lying = await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { alg: 'PS256' }, payload })
  t.equal(decodeProtectedHeader(lying).alg, 'PS256', 'header may lie about the alg')

  await t.rejects(forgeToken({ alg: 'RS256', payload }), TypeError)
})

t.test('upstream: records and answers HTTP', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  t.match(upstream.url, /^http:\/\/127\.0\.0\.1:\d+$/)

  const plain = await fetch(`${upstream.url}/some/path?x=1`, { headers: { 'x-test': 'yes' } })
  t.equal(plain.status, 200)
  const echoed = await plain.json() as { method: string, url: string, headers: Record<string, string>, bodyLength: number }
  t.equal(echoed.method, 'GET')
  t.equal(echoed.url, '/some/path?x=1')
  t.equal(echoed.headers['x-test'], 'yes')
  t.equal(echoed.bodyLength, 0)

  const echo = await fetch(`${upstream.url}/echo`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-custom' },
    body: 'hello body'
  })
  t.equal(echo.headers.get('content-type'), 'application/x-custom')
  t.equal(await echo.text(), 'hello body')

  const teapot = await fetch(`${upstream.url}/status/418`)
  t.equal(teapot.status, 418)
  await teapot.arrayBuffer()

  const started = Date.now()
  const slow = await fetch(`${upstream.url}/slow?ms=150`)
  await slow.arrayBuffer()
  t.ok(Date.now() - started >= 140, '/slow waits')

  const big = await fetch(`${upstream.url}/big?bytes=200001`)
  t.equal(big.headers.get('content-type'), 'text/plain')
  const bytes = Buffer.from(await big.arrayBuffer())
  t.equal(bytes.length, 200001)
  t.ok(bytes.every((b) => b === 0x78), 'all x')

  const redirect = await fetch(`${upstream.url}/redirect`, { redirect: 'manual' })
  t.equal(redirect.status, 302)
  t.equal(redirect.headers.get('location'), '/somewhere')
  await redirect.arrayBuffer()

  t.same(upstream.requests.map((r) => `${r.method} ${r.url}`), [
    'GET /some/path?x=1',
    'POST /echo',
    'GET /status/418',
    'GET /slow?ms=150',
    'GET /big?bytes=200001',
    'GET /redirect'
  ])
  t.equal(upstream.requests[0]?.headers['x-test'], 'yes')
  t.equal(upstream.requests[1]?.body.toString(), 'hello body')

  upstream.reset()
  t.same(upstream.requests, [])
})

t.test('upstream: records and echoes WebSocket traffic', async (t) => {
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const wsUrl = upstream.url.replace('http', 'ws')

  const ws = new WebSocket(`${wsUrl}/chat?room=1`, ['first', 'second'], { headers: { 'x-test': 'ws' } })
  const received: Array<{ data: string, binary: boolean }> = []
  ws.on('message', (data, binary) => received.push({ data: data.toString(), binary }))
  await once(ws, 'open')
  t.equal(ws.protocol, 'first', 'the first offered subprotocol is negotiated')

  ws.send('hello')
  ws.send(Buffer.from('bin'), { binary: true })
  await until(() => received.length >= 2, 3000, 'both echoes back', 5)
  t.same(received, [{ data: 'hello', binary: false }, { data: 'bin', binary: true }])

  const closed = once(ws, 'close')
  ws.send('close:4001:bye now')
  const [code, reason] = await closed as [number, Buffer]
  t.equal(code, 4001)
  t.equal(reason.toString(), 'bye now')

  const [record] = upstream.wsConnections
  t.equal(record?.url, '/chat?room=1')
  t.equal(record?.protocol, 'first')
  t.equal(record?.headers['x-test'], 'ws')
  t.same(record?.messages, [
    { data: 'hello', binary: false },
    { data: 'bin', binary: true },
    { data: 'close:4001:bye now', binary: false }
  ])

  const plain = new WebSocket(`${wsUrl}/`)
  await once(plain, 'open')
  t.equal(plain.protocol, '', 'no subprotocol offered, none chosen')
  plain.close(4002, 'client done')
  await once(plain, 'close')
  await until(() => upstream.wsConnections[1]?.closed !== undefined, 3000, 'the upstream recorded the client close', 5)
  t.same(upstream.wsConnections[1]?.closed, { code: 4002, reason: 'client done' }, 'records the client close')

  const lingering = new WebSocket(`${wsUrl}/open`)
  await once(lingering, 'open')
  const lingeringClosed = once(lingering, 'close')
  await upstream.close()
  const [lingeringCode] = await lingeringClosed as [number, Buffer]
  t.equal(lingeringCode, 1006, 'close() terminates open clients (no close frame: 1006)')
})
