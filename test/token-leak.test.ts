// Logs never carry a credential. A mix of traffic at LOG_LEVEL=trace (valid tokens in every accepted location, invalid
// and forged tokens, ?access_token= where it is not accepted, denials of every kind, upstream and JWKS failures), then
// every captured log line is grepped for every raw token, its payload and signature parts, Authorization values and
// "Bearer ". The app never receives a token either.
import { once } from 'node:events'
import t from 'tap'
import { decodeJwt, generateKeyPair } from 'jose'
import { claims, flipSignatureChar, foreignRsaKey, forgeToken } from './helpers/forge.js'
import { sendVerbatim, startBackends, startGateway } from './helpers/gateway.js'
import { exchange, upgrade } from './helpers/ws-client.js'
import { until } from './helpers/wait.js'

const YAML = `
auth:
  publicPaths: ['/public/**']
  routes:
    - path: /api/resonance/admin/**
      methods: [POST]
      roles: [admin]
`

const HTTPS = { 'x-forwarded-proto': 'https' }

t.test('no token, token part or Authorization value ever reaches a log line (LOG_LEVEL=trace)', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const env = {
    LOG_LEVEL: 'trace',
    ALLOW_INSECURE_HTTP: 'false',
    TRUST_PROXY: '127.0.0.1',
    JWKS_MIN_REFRESH_INTERVAL: '0',
    UPSTREAM_TIMEOUT: '300ms'
  }
  const g = await startGateway(t, issuer, upstream, { env, yaml: YAML })

  const secrets = new Set<string>()
  const keep = (s: string): string => { secrets.add(s); return s }
  const foreign = await foreignRsaKey()
  const ec = await generateKeyPair('ES256', { extractable: true })
  const now = Math.floor(Date.now() / 1000)
  const real = { ...decodeJwt(await issuer.token({ sub: 'leaky' })) }
  const without = (name: string): Record<string, unknown> => {
    const c = { ...real }
    delete c[name]
    return c
  }

  const valid = keep(await issuer.token({ sub: 'user-1', realmRoles: ['user'], username: 'User One' }))
  const validQuery = keep(await issuer.token({ sub: 'user-2' }))
  const validProto = keep(await issuer.token({ sub: 'user-3' }))
  const admin = keep(await issuer.token({ sub: 'root', realmRoles: ['admin'] }))
  const basic = keep('Basic ' + Buffer.from('alice:correct-horse-battery-staple').toString('base64'))
  const invalid = [
    await issuer.sign({ ...real, exp: now - 60 }),
    await issuer.sign({ ...real, nbf: now + 60 }),
    await issuer.sign({ ...real, iss: 'https://evil.example/realms/x' }),
    await issuer.token({ sub: 'aud', audience: 'other-api' }),
    flipSignatureChar(await issuer.token({ sub: 'flip' })),
    await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid: issuer.currentKid() }, payload: claims(issuer) }),
    await forgeToken({ alg: 'none', payload: claims(issuer) }),
    await forgeToken({ alg: 'HS256', key: issuer.publicKeyPem(), header: { kid: issuer.currentKid() }, payload: claims(issuer) }),
    await forgeToken({ alg: 'ES256', key: ec.privateKey, payload: claims(issuer) }),
    await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid: 'made-up-kid' }, payload: claims(issuer) }),
    await issuer.sign(without('sub')),
    await issuer.sign(without('exp')),
    await issuer.sign({ ...real, typ: 'ID' }),
    'eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24gYXQgYWxs.c2lnbmF0dXJlLXRoYXQtaXMtbG9uZy1lbm91Z2g'
  ].map(keep)

  const statuses: Record<string, number> = {}
  const call = async (name: string, path: string, headers: Record<string, string>, method = 'GET'): Promise<void> => {
    const res = await fetch(`${g.url}${path}`, { method, headers })
    await res.arrayBuffer()
    statuses[name] = res.status
  }

  // --- HTTP -----------------------------------------------------------------------------------------------------------
  await call('valid header', '/api/things?x=1', { ...HTTPS, authorization: `Bearer ${valid}` })
  await call('valid header + ?access_token (ignored, stripped)', `/api/things?access_token=${validQuery}&y=2`, { ...HTTPS, authorization: `Bearer ${valid}` })
  await call('?access_token on plain HTTP', `/api/things?access_token=${validQuery}`, HTTPS)
  await call('valid header over plaintext', '/api/things', { authorization: `Bearer ${valid}` })
  await call('Basic', '/api/things', { ...HTTPS, authorization: basic })
  await call('Bearer abc', '/api/things', { ...HTTPS, authorization: 'Bearer abc' })
  await call('empty Bearer', '/api/things', { ...HTTPS, authorization: 'Bearer ' })
  for (const [i, tok] of invalid.entries()) {
    await call(`invalid ${i}`, `/api/things?i=${i}`, { ...HTTPS, authorization: `Bearer ${tok}` })
  }
  await call('forbidden', '/api/resonance/admin/x', { ...HTTPS, authorization: `Bearer ${valid}` }, 'POST')
  await call('admin allowed', '/api/resonance/admin/x', { ...HTTPS, authorization: `Bearer ${admin}` }, 'POST')
  await call('public with a token', '/public/x', { ...HTTPS, authorization: `Bearer ${valid}` })
  statuses['invalid path'] = (await sendVerbatim(g.url, 'GET', '/../etc/passwd', { ...HTTPS, authorization: `Bearer ${valid}` })).status
  statuses['bad percent-encoding'] = (await sendVerbatim(g.url, 'GET', `/api/%zz?access_token=${validQuery}`, { ...HTTPS, authorization: `Bearer ${valid}` })).status
  await call('upstream timeout', `/slow?ms=3000&access_token=${validQuery}`, { ...HTTPS, authorization: `Bearer ${valid}` })

  // JWKS failing while an unknown kid forces a refresh (the refresh error is logged)
  issuer.setJwksMode('error')
  await call('unknown kid while JWKS fails', '/api/things', { ...HTTPS, authorization: `Bearer ${invalid[9] ?? ''}` })
  // and a second gateway that never loaded the JWKS: jwks_unavailable
  const g2 = await startGateway(t, issuer, upstream, { env, yaml: YAML })
  const res2 = await fetch(`${g2.url}/api/things`, { headers: { ...HTTPS, authorization: `Bearer ${valid}` } })
  await res2.arrayBuffer()
  statuses['jwks unavailable'] = res2.status
  issuer.setJwksMode('ok')

  // --- WebSocket ------------------------------------------------------------------------------------------------------
  const q = await upgrade(t, `${g.wsUrl}/ws/chat?access_token=${validQuery}&room=1`, { headers: HTTPS })
  if (q.kind === 'refused') t.fail(`?access_token upgrade refused: ${q.status}`)
  else {
    t.equal(await exchange(q.ws, 'hello'), 'hello')
    q.ws.close(1000, 'done')
    await once(q.ws, 'close')
  }
  const p = await upgrade(t, `${g.wsUrl}/ws/chat`, { protocols: ['bearer', validProto, 'chat.v1'], headers: HTTPS })
  if (p.kind === 'refused') t.fail(`protocol upgrade refused: ${p.status}`)
  else {
    t.equal(await exchange(p.ws, 'ping'), 'ping')
    const closed = once(p.ws, 'close')
    p.ws.send('close:4001:bye') // the app closes
    await closed
  }
  const abrupt = await upgrade(t, `${g.wsUrl}/ws/chat?access_token=${validQuery}`, { headers: HTTPS })
  if (abrupt.kind === 'open') abrupt.ws.terminate()
  // an upgrade that opened instead shows as 101
  statuses['ws expired'] = (await upgrade(t, `${g.wsUrl}/ws/chat?access_token=${invalid[0] ?? ''}`, { headers: HTTPS })).status
  statuses['ws two tokens'] = (await upgrade(t, `${g.wsUrl}/ws/chat?access_token=${validQuery}`, { headers: { ...HTTPS, authorization: `Bearer ${valid}` } })).status
  statuses['ws plaintext'] = (await upgrade(t, `${g.wsUrl}/ws/chat?access_token=${validQuery}`)).status
  statuses['ws bearer marker without token'] = (await upgrade(t, `${g.wsUrl}/ws/chat`, { protocols: ['bearer'], headers: HTTPS })).status
  statuses['ws forged in protocol'] = (await upgrade(t, `${g.wsUrl}/ws/chat`, { protocols: ['bearer', invalid[5] ?? ''], headers: HTTPS })).status
  statuses['ws no token'] = (await upgrade(t, `${g.wsUrl}/ws/chat`, { headers: HTTPS })).status

  // let the closes settle (upstream records them) so their log lines are in; the test fails if one never arrives
  await until(() => upstream.wsConnections.every((c) => c.closed !== undefined), 3_000, 'the app recorded the close of every WebSocket', 20)

  t.match(statuses, {
    'valid header': 200,
    'valid header + ?access_token (ignored, stripped)': 200,
    '?access_token on plain HTTP': 401,
    'valid header over plaintext': 401,
    Basic: 401,
    'Bearer abc': 401,
    'empty Bearer': 401,
    forbidden: 403,
    'admin allowed': 200,
    'public with a token': 200,
    'invalid path': 400,
    'bad percent-encoding': 400,
    'upstream timeout': 504,
    'unknown kid while JWKS fails': 401,
    'jwks unavailable': 401,
    'ws expired': 401,
    'ws two tokens': 400,
    'ws plaintext': 401,
    'ws bearer marker without token': 401,
    'ws forged in protocol': 401,
    'ws no token': 401
  }, 'the traffic mix had the intended outcomes')
  for (const i of invalid.keys()) t.equal(statuses[`invalid ${i}`], 401, `invalid token ${i} refused`)

  // --- the grep -------------------------------------------------------------------------------------------------------
  const lines = [...g.rawLogs, ...g2.rawLogs]
  const reasons = new Set(g.audits().map((l) => String(l.reason)))
  t.ok(reasons.size >= 12, `denials of many kinds were logged: ${[...reasons].sort().join(', ')}`)
  t.ok(lines.some((l) => /"level":(10|20)\b/.test(l)), 'trace/debug lines were captured')
  t.ok(lines.some((l) => l.includes('upstream request failed')), 'the upstream failure was logged')
  t.ok(lines.some((l) => l.includes('jwks refresh failed')), 'the JWKS failure was logged')
  t.comment(`${lines.length} log lines, ${secrets.size} secrets`)

  const needles: Array<{ what: string, value: string }> = []
  for (const s of secrets) {
    needles.push({ what: 'raw credential', value: s })
    const [, payload, signature] = s.split('.')
    if (signature !== undefined && signature.length >= 16) needles.push({ what: 'signature part', value: signature })
    if (payload !== undefined && payload.length >= 16) needles.push({ what: 'payload part', value: payload })
  }
  needles.push({ what: 'Basic credential', value: basic.slice('Basic '.length) })

  const leaksIn = (line: string): string[] => {
    const found: string[] = []
    for (const { what, value } of needles) if (line.includes(value)) found.push(`${what} ${value.slice(0, 12)}…`)
    if (line.includes('Bearer ')) found.push('"Bearer "')
    if (/bearer[\s,]+eyJ/i.test(line)) found.push('a token after "bearer"')
    if (/"authorization"\s*:\s*"(?!\[Redacted\])/i.test(line)) found.push('an unredacted authorization field')
    if (/access_token=(?!\[Redacted\])[^&"\s]/.test(line)) found.push('an access_token query value')
    return found
  }
  // the detector itself works (a broken grep would pass vacuously)
  for (const [name, canary] of [
    ['a raw token', `{"msg":"x","url":"/a${valid}"}`],
    ['a signature part', `{"sig":"${valid.split('.')[2] ?? ''}"}`],
    ['"Bearer "', '{"headers":{"authorization":"Bearer abc"}}'],
    ['a Basic credential', `{"h":"${basic.slice(6)}"}`],
    ['an access_token value', '{"url":"/a?access_token=x"}']
  ]) t.ok(leaksIn(canary ?? '').length > 0, `the grep catches ${name}`)
  t.same(leaksIn('{"headers":{"authorization":"[Redacted]"}}'), [], 'and lets a redacted field pass')

  const hits: string[] = []
  for (const [n, line] of lines.entries()) for (const h of leaksIn(line)) hits.push(`line ${n}: ${h}`)
  t.same(hits, [], 'zero hits in every captured log line')

  // the app never saw a credential either
  const appHits: string[] = []
  for (const r of upstream.requests) {
    if (r.headers.authorization !== undefined) appHits.push(`${r.url}: authorization header`)
    if (r.url.includes('access_token')) appHits.push(`${r.url}: access_token in the URL`)
  }
  for (const c of upstream.wsConnections) {
    if (c.url.includes('access_token')) appHits.push(`ws ${c.url}: access_token in the URL`)
    const all = JSON.stringify(c.headers)
    for (const s of secrets) if (all.includes(s)) appHits.push(`ws ${c.url}: a token in the handshake headers`)
  }
  t.same(appHits, [], 'no token reached the app')
  t.ok(upstream.requests.length >= 4 && upstream.wsConnections.length >= 3, 'the app did get the allowed traffic')
})
