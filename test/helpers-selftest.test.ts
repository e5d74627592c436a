// Proves the test helpers do what the other tests rely on: a Keycloak-shaped issuer, attack-token forging, a
// recording HTTP + WebSocket upstream, the gateway's fixtures and requests, the Redis helpers, the gateway process,
// the WebSocket client side and the unit-test inputs.
import { createHmac, X509Certificate } from 'node:crypto'
import { once } from 'node:events'
import { execFileSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import t from 'tap'
import { Redis } from 'ioredis'
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
import {
  BACKCHANNEL_LOGOUT_EVENT,
  DEFAULT_SUB,
  LOGOUT_CLIENT_ID,
  LOGOUT_SUB_ONLY_CLIENT_ID,
  LOGOUT_TOKEN_TTL_SECONDS,
  startIssuer,
  type TestIssuer
} from './helpers/issuer.js'
import { claims, flipSignatureChar, foreignRsaKey, forgeToken } from './helpers/forge.js'
import { until } from './helpers/wait.js'
import { respondHeaders, startUpstream, type TestUpstream } from './helpers/upstream.js'
import { getAs, readyz, selfSignedCert, sendVerbatim, startBackends, startGateway, untilReady } from './helpers/gateway.js'
import { freePort } from './helpers/ports.js'
import { distStale, ENTRY, ensureBuilt, spawnGateway, unreachableBackendsEnv, type GatewayProcess } from './helpers/process.js'
import { keyPrefix, ownRedis, ping, redisUrl, sharedRedis, type RedisServer } from './helpers/redis.js'
import { connect, echo, exchange, refusal, upgrade } from './helpers/ws-client.js'
import { ALICE, auditedRequest, forwardContext } from './helpers/units.js'

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

interface Received { method: string, url: string, headers: http.IncomingHttpHeaders, body: string }

/** A back-channel logout receiver: records every request and answers `status` (settable). */
async function startReceiver (t: { teardown (fn: () => unknown): void }): Promise<{ url: string, received: Received[], status: number }> {
  const rp = { url: '', received: [] as Received[], status: 200 }
  const server = http.createServer((req, res) => {
    let body = ''
    req.setEncoding('utf8')
    req.on('data', (c: string) => { body += c })
    req.on('end', () => {
      rp.received.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, body })
      res.writeHead(rp.status, { 'cache-control': 'no-store' }).end()
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  t.teardown(() => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()) }))
  rp.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  return rp
}

t.test('issuer: back-channel logout: the provider signs and POSTs real logout tokens; sid and azp in access tokens', async (t) => {
  const issuer = await startIssuer()
  t.teardown(() => issuer.close())
  // a fresh key set each time: jose caches a remote JWKS, and rotate() below adds a key
  const jwks = async (...args: Parameters<ReturnType<typeof createRemoteJWKSet>>) => await createRemoteJWKSet(new URL(issuer.jwksUrl))(...args)
  const rp = await startReceiver(t)
  const nowSec = () => Math.floor(Date.now() / 1000)

  const doc = await getJson<Record<string, unknown>>(`${issuer.issuer}/.well-known/openid-configuration`)
  t.equal(doc.backchannel_logout_supported, true, 'discovery: backchannel_logout_supported')
  t.equal(doc.backchannel_logout_session_supported, true, 'discovery: backchannel_logout_session_supported')

  await t.rejects(issuer.backchannelLogout({ sub: 'alice', sid: 'S-1' }), /no back-channel logout URI/, 'no URI set: rejects')
  t.throws(() => issuer.setBackchannelLogoutUri('not a url'), TypeError, 'a malformed URI is refused at once')

  await t.test('session required (LOGOUT_CLIENT_ID): sub and sid, POSTed as a form to the URI set', async (t) => {
    issuer.setBackchannelLogoutUri(`${rp.url}/backchannel-logout`)
    rp.received.length = 0
    let onPostAt: number | undefined
    const before = Date.now()
    const res = await issuer.backchannelLogout({ sub: 'alice', sid: 'S-1', onPost: (at) => { onPostAt = at } })
    t.match(res, { ok: true, status: 200, error: undefined, logoutToken: String })
    t.ok(res.postedAt !== undefined && res.postedAt >= before && res.postedAt <= res.answeredAt, 'postedAt: between the call and the answer')
    t.equal(onPostAt, res.postedAt, 'onPost is called with postedAt')

    t.equal(rp.received.length, 1, 'exactly one POST')
    const [req] = rp.received
    t.equal(req?.method, 'POST')
    t.equal(req?.url, '/backchannel-logout')
    t.match(req?.headers['content-type'], /^application\/x-www-form-urlencoded/)
    const form = new URLSearchParams(req?.body)
    t.same([...form.keys()], ['logout_token'], 'one form field: logout_token')
    t.equal(form.get('logout_token'), res.logoutToken, 'logoutToken: what was sent')

    const token = res.logoutToken ?? ''
    t.same(decodeProtectedHeader(token), { alg: 'RS256', typ: 'logout+jwt', kid: issuer.currentKid() }, 'header: typ logout+jwt, current kid')
    const { payload } = await jwtVerify(token, jwks, { issuer: issuer.issuer, audience: LOGOUT_CLIENT_ID, typ: 'logout+jwt', algorithms: ['RS256'] })
    t.same(Object.keys(payload).sort(), ['aud', 'events', 'exp', 'iat', 'iss', 'jti', 'sid', 'sub'], 'exactly the claims Keycloak sends (no nonce)')
    t.match(payload, { sub: 'alice', sid: 'S-1', aud: LOGOUT_CLIENT_ID, iss: issuer.issuer, jti: String })
    t.same(payload.events, { [BACKCHANNEL_LOGOUT_EVENT]: {} }, 'events: the back-channel-logout member, an empty object')
    t.equal((payload.exp ?? 0) - (payload.iat ?? 0), LOGOUT_TOKEN_TTL_SECONDS, 'exp = iat + 120')
    t.ok(Math.abs((payload.iat ?? 0) - nowSec()) <= 2, 'iat: now')

    const again = await issuer.backchannelLogout({ sub: 'alice', sid: 'S-1' })
    t.not(decodeJwt(again.logoutToken ?? '').jti, payload.jti, 'every logout token has its own jti')
  })

  await t.test('session not required (LOGOUT_SUB_ONLY_CLIENT_ID): sub only', async (t) => {
    const res = await issuer.backchannelLogout({ sub: 'bob', sid: 'ignored', clientId: LOGOUT_SUB_ONLY_CLIENT_ID })
    t.equal(res.ok, true)
    const payload = decodeJwt(res.logoutToken ?? '')
    t.notOk('sid' in payload, 'no sid')
    t.match(payload, { sub: 'bob', aud: LOGOUT_SUB_ONLY_CLIENT_ID, events: { [BACKCHANNEL_LOGOUT_EVENT]: {} } })
    await t.rejects(issuer.backchannelLogout({ sub: 'bob', clientId: 'not a client!' }), TypeError, 'an invalid client id rejects')
  })

  await t.test('what happened: refusals and network errors resolve, with the status and the provider\'s error', async (t) => {
    rp.status = 400
    const refused = await issuer.backchannelLogout({ sub: 'alice', sid: 'S-2' })
    t.match(refused, { ok: false, status: 400, logoutToken: String })
    t.match(refused.error, /^expected 200 OK from http:\/\/127\.0\.0\.1:\d+\/backchannel-logout, got: 400 Bad Request$/)
    rp.status = 204
    t.match(await issuer.backchannelLogout({ sub: 'alice', sid: 'S-3' }), { ok: true, status: 204 }, '204 counts as success')
    rp.status = 200

    const closed = http.createServer()
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve))
    const port = (closed.address() as AddressInfo).port
    await new Promise<void>((resolve) => closed.close(() => resolve()))
    issuer.setBackchannelLogoutUri(`http://127.0.0.1:${port}/backchannel-logout`)
    const unreachable = await issuer.backchannelLogout({ sub: 'alice', sid: 'S-4' })
    t.match(unreachable, { ok: false, status: undefined, error: /fetch failed/ }, 'nothing listening: not ok, no status')
    t.notMatch(unreachable.error, /special-use IP/, 'not the SSRF guard: the fetch override removed it')

    issuer.setBackchannelLogoutUri(undefined)
    await t.rejects(issuer.backchannelLogout({ sub: 'alice', sid: 'S-5' }), /no back-channel logout URI/, 'unset again: rejects')
    issuer.setBackchannelLogoutUri(`${rp.url}/backchannel-logout`)
  })

  await t.test('after rotate() the provider signs with the new key', async (t) => {
    await issuer.rotate()
    const res = await issuer.backchannelLogout({ sub: 'alice', sid: 'S-6' })
    t.equal(res.ok, true)
    t.equal(decodeProtectedHeader(res.logoutToken ?? '').kid, issuer.currentKid())
    await jwtVerify(res.logoutToken ?? '', jwks, { issuer: issuer.issuer, audience: LOGOUT_CLIENT_ID })
  })

  await t.test('startIssuer({ backchannelLogoutUri })', async (t) => {
    const other = await startIssuer({ backchannelLogoutUri: `${rp.url}/other` })
    t.teardown(() => other.close())
    rp.received.length = 0
    t.equal((await other.backchannelLogout({ sub: 'carol', sid: 'S-7' })).ok, true)
    t.equal(rp.received[0]?.url, '/other')
  })

  await t.test('access tokens: sid, and azp as Keycloak sets it', async (t) => {
    const withSid = decodeJwt(await issuer.token({ sub: 'alice', sid: 'S-1' }))
    t.match(withSid, { sub: 'alice', sid: 'S-1', azp: LOGOUT_CLIENT_ID, aud: issuer.audience }, 'sid, azp = the login client')
    t.match(decodeJwt(await issuer.token({ sub: 'alice', sid: 'S-1', azp: 'other-app' })), { sid: 'S-1', azp: 'other-app' }, 'azp given')
    t.match(decodeJwt(await issuer.token({ sub: 'alice', azp: 'other-app' })), { azp: 'other-app' })
    const plain = decodeJwt(await issuer.token({ sub: 'alice' }))
    t.notOk('sid' in plain, 'no sid unless asked')
    t.equal(plain.azp, 'alice', 'azp without sid: the client id (= sub), as before')
  })

  await t.test('logoutToken(): provider-shaped defaults, overrides, undefined deletes', async (t) => {
    const token = await issuer.logoutToken()
    t.same(decodeProtectedHeader(token), { alg: 'RS256', typ: 'logout+jwt', kid: issuer.currentKid() })
    const { payload } = await jwtVerify(token, jwks, { issuer: issuer.issuer, audience: LOGOUT_CLIENT_ID, typ: 'logout+jwt' })
    t.same(Object.keys(payload).sort(), ['aud', 'events', 'exp', 'iat', 'iss', 'jti', 'sid', 'sub'], 'the claims the provider sends')
    t.match(payload, { sub: DEFAULT_SUB, sid: String, jti: String, events: { [BACKCHANNEL_LOGOUT_EVENT]: {} } })
    t.equal((payload.exp ?? 0) - (payload.iat ?? 0), LOGOUT_TOKEN_TTL_SECONDS)
    t.not(decodeJwt(await issuer.logoutToken()).jti, payload.jti, 'a fresh jti each time')

    const custom = await issuer.logoutToken({ sub: 'x', sid: undefined, events: undefined, nonce: 'n', aud: ['a', 'b'] }, { typ: 'JWT' })
    t.same(Object.keys(decodeJwt(custom)).sort(), ['aud', 'exp', 'iat', 'iss', 'jti', 'nonce', 'sub'], 'claims replaced, added and deleted')
    t.match(decodeJwt(custom), { sub: 'x', nonce: 'n', aud: ['a', 'b'], iss: issuer.issuer })
    t.notOk('sid' in decodeJwt(custom), 'sid deleted')
    t.notOk('events' in decodeJwt(custom), 'events deleted')
    t.equal(decodeProtectedHeader(custom).typ, 'JWT')
    t.same(decodeProtectedHeader(await issuer.logoutToken({}, { typ: undefined })), { alg: 'RS256', kid: issuer.currentKid() }, 'typ dropped from the header')
    await jwtVerify(custom, jwks, { issuer: issuer.issuer, audience: 'a' })

    const forged = flipSignatureChar(token)
    await t.rejects(jwtVerify(forged, jwks), { code: 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED' }, 'flipSignatureChar: a forged signature')
  })
})

t.test('issuer: login() is a real session at the provider; its logout() (end_session) makes the provider POST the logout token', async (t) => {
  const issuer = await startIssuer()
  t.teardown(() => issuer.close())
  const jwks = async (...args: Parameters<ReturnType<typeof createRemoteJWKSet>>) => await createRemoteJWKSet(new URL(issuer.jwksUrl))(...args)
  const rp = await startReceiver(t)
  issuer.setBackchannelLogoutUri(`${rp.url}/backchannel-logout`)

  const session = await issuer.login('alice')
  t.equal(session.sub, 'alice')
  t.same(decodeProtectedHeader(session.accessToken), { alg: 'RS256', typ: 'JWT', kid: issuer.currentKid() }, 'access token header as Keycloak\'s')
  const { payload: at } = await jwtVerify(session.accessToken, jwks, { issuer: issuer.issuer, audience: issuer.audience, algorithms: ['RS256'] })
  t.match(at, { sub: 'alice', sid: session.sid, azp: LOGOUT_CLIENT_ID, client_id: LOGOUT_CLIENT_ID, typ: 'Bearer', scope: 'profile email' },
    'access token: the user, the session\'s sid, azp = the login client')
  t.ok(typeof session.sid === 'string' && session.sid.length > 10, 'a provider-made sid')
  const { payload: idt } = await jwtVerify(session.idToken, jwks, { issuer: issuer.issuer, audience: LOGOUT_CLIENT_ID })
  t.match(idt, { sub: 'alice', sid: session.sid, nonce: String }, 'ID token: the same sid, a nonce')

  const other = await issuer.login('alice')
  t.not(other.sid, session.sid, 'each login is a new session')
  t.notOk('sid' in decodeJwt(await issuer.token({ sub: 'alice' })), 'client_credentials tokens: still no sid unless asked')
  await t.rejects(issuer.login('not a sub!'), TypeError, 'an invalid sub is refused')

  rp.received.length = 0
  let confirmAt: number | undefined
  const ended = await session.logout({ onConfirm: (at) => { confirmAt = at } })
  t.equal(confirmAt, ended.confirmSentAt, 'onConfirm: the moment the confirmation is sent')
  t.match(ended.location, /\/protocol\/openid-connect\/logout\/success$/, 'the provider answered with its 303 to the success page')
  t.equal(rp.received.length, 1, 'the provider POSTed once, before answering')
  t.equal(ended.backchannel.length, 1)
  const [post] = ended.backchannel
  t.match(post, { ok: true, status: 200, error: undefined, logoutToken: String })
  t.ok(post !== undefined && post.postedAt !== undefined && post.postedAt >= ended.confirmSentAt && post.answeredAt <= ended.answeredAt,
    'postedAt and answeredAt: within the confirmation round trip')
  t.equal(new URLSearchParams(rp.received[0]?.body).get('logout_token'), post?.logoutToken, 'logoutToken: what was sent')
  const { payload: lt } = await jwtVerify(post?.logoutToken ?? '', jwks, { issuer: issuer.issuer, audience: LOGOUT_CLIENT_ID, typ: 'logout+jwt' })
  t.match(lt, { sub: 'alice', sid: session.sid, events: { [BACKCHANNEL_LOGOUT_EVENT]: {} } }, 'the logout token names the session')
  t.equal(await session.logout(), ended, 'logout() again: the same result, nothing sent again')
  t.equal(rp.received.length, 1)

  rp.status = 400
  const refused = await other.logout()
  t.match(refused.backchannel, [{ ok: false, status: 400, error: /^expected 200 OK from .*, got: 400 Bad Request$/ }],
    'a refusal does not fail the logout; the provider\'s error is reported')
  rp.status = 200

  const quiet = await issuer.login('bob')
  issuer.setBackchannelLogoutUri(undefined)
  t.same((await quiet.logout()).backchannel, [], 'the URI unset since the login: the logout sends no POST')
  await t.rejects(issuer.login('bob'), /no back-channel logout URI/, 'login without a URI: rejects (no sid without one)')

  await issuer.rotate()
  issuer.setBackchannelLogoutUri(`${rp.url}/backchannel-logout`)
  const rotated = await issuer.login('carol')
  t.equal(decodeProtectedHeader(rotated.accessToken).kid, issuer.currentKid(), 'after rotate(): the new key')
  t.equal((await rotated.logout()).backchannel[0]?.ok, true)
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

t.test('gateway helpers: startBackends, readyz, untilReady, getAs, sendVerbatim, selfSignedCert', async (t) => {
  let inner: { issuer: TestIssuer, upstream: TestUpstream } | undefined
  await t.test('startBackends closes both when its test ends', async (tt) => {
    inner = await startBackends(tt)
    tt.match(inner.issuer.issuer, /^http:\/\/127\.0\.0\.1:\d+\/realms\/resonance$/)
    tt.equal((await fetch(`${inner.upstream.url}/x`)).status, 200, 'the upstream answers')
  })
  await t.rejects(fetch(`${inner?.upstream.url ?? ''}/x`), 'the upstream is closed')
  await t.rejects(fetch(inner?.issuer.jwksUrl ?? ''), 'and the issuer')

  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream, { noStart: true })
  const before = await readyz(g)
  t.equal(before.status, 503, 'readyz: 503 before start()')
  t.match(before.body, { status: 'not_ready', checks: { jwks: { ok: false } } }, 'with the parsed checks')
  await g.gw.start()
  await untilReady(g)
  t.match(await readyz(g), { status: 200, body: { status: 'ready', checks: { jwks: { ok: true } } } }, 'untilReady returns once it is 200')
  await t.rejects(untilReady({ adminUrl: `http://127.0.0.1:${await freePort()}` }, 300, 'nobody there'), /not within 300 ms: nobody there/,
    'untilReady fails after its bound when nothing answers')

  const token = await issuer.token({ sub: 'getas-user' })
  upstream.reset()
  const a = await getAs(g, token)
  t.equal(a.status, 200)
  t.match(upstream.requests[0]?.url, /^\/api\/[0-9a-f-]{36}$/, 'getAs: a fresh /api/<uuid> by default')
  t.equal(upstream.requests[0]?.headers['x-user-sub'], 'getas-user', 'with the token as bearer')
  t.equal((JSON.parse(a.body) as { url: string }).url, upstream.requests[0]?.url, 'the whole body read')
  t.equal((await getAs(g, token, '/given/path')).status, 200)
  t.equal(upstream.requests[1]?.url, '/given/path', 'or the path given')
  t.equal((await getAs(g, 'not-a-token')).status, 401)

  const v = await sendVerbatim(upstream.url, 'GET', '/a/../b?x=1', { 'x-h': '1' })
  t.equal(upstream.requests.at(-1)?.url, '/a/../b?x=1', 'sendVerbatim: the target is sent as written')
  t.equal(upstream.requests.at(-1)?.headers['x-h'], '1', 'with the headers given')
  t.equal(v.status, 200)
  const joined = await sendVerbatim(upstream.url, 'GET', `/respond?headers=${respondHeaders([['X-Dup', 'a'], ['X-Dup', 'b']])}`)
  t.equal(joined.headers['x-dup'], 'a, b', 'repeated response headers joined')
  t.match(JSON.parse(joined.body), { method: 'GET' }, 'the whole body')

  const { cert, key } = selfSignedCert()
  const x509 = new X509Certificate(readFileSync(cert))
  t.match(x509.subjectAltName, /IP Address:127\.0\.0\.1/, 'selfSignedCert: for 127.0.0.1')
  t.match(readFileSync(key, 'utf8'), /^-----BEGIN PRIVATE KEY-----/, 'with its key')
})

t.test('redis helpers: keyPrefix, sharedRedis (deletes only its own prefixes), ownRedis (killed, even frozen)', async (t) => {
  const p1 = keyPrefix()
  t.match(p1, /^test:[0-9a-f-]{36}:$/)
  t.not(keyPrefix(), p1, 'a new one each time')

  const check = new Redis(await redisUrl(), { lazyConnect: true, maxRetriesPerRequest: 1 })
  await check.connect()
  t.teardown(() => check.disconnect())
  const foreign = `${keyPrefix()}not-mine`
  await check.set(foreign, '1', 'PX', 60_000)
  let mine = ''
  let client: Redis | undefined
  await t.test('sharedRedis for the life of a test', async (tt) => {
    const r = await sharedRedis(tt)
    client = r.client
    tt.equal(r.url, await redisUrl())
    mine = `${r.freshPrefix()}k`
    await r.client.set(mine, 'v')
    tt.equal(await check.get(mine), 'v', 'its client writes to the shared Redis')
  })
  t.equal(await check.exists(mine), 0, 'its prefixes\' keys are gone when the test ends')
  t.equal(await check.get(foreign), '1', 'other keys are not touched')
  t.equal(client?.status, 'end', 'its client is disconnected')
  await check.del(foreign)

  let server: RedisServer | undefined
  await t.test('ownRedis for the life of a test', async (tt) => {
    server = await ownRedis(tt)
    tt.ok(await ping(server.port), 'a private redis-server answers')
    server.process.kill('SIGSTOP') // frozen, as a test may leave it
  })
  t.ok(server?.process.exitCode !== null || server?.process.signalCode !== null, 'killed when the test ends, frozen or not')
  t.notOk(await ping(server?.port ?? 0), 'nothing answers on its port')
})

t.test('process helpers: ensureBuilt, spawnGateway (listening, logs, exit, teardown, wrapper), unreachableBackendsEnv', async (t) => {
  ensureBuilt()
  t.notOk(distStale(), 'ensureBuilt leaves dist/ up to date with src/')
  t.ok(existsSync(ENTRY))

  const { port, admin, env } = await unreachableBackendsEnv()
  t.match(env, { PORT: String(port), ADMIN_PORT: String(admin), JWT_AUDIENCE: 'gw', ALLOW_INSECURE_HTTP: 'true' })
  const p = spawnGateway(t, { ...env, LOG_LEVEL: 'info', SHUTDOWN_DELAY: '0' })
  const at = await p.listening()
  t.strictSame(at, { url: `http://127.0.0.1:${port}`, wsUrl: `ws://127.0.0.1:${port}`, adminUrl: `http://127.0.0.1:${admin}` }, 'listening: the URLs it logged')
  t.equal((await fetch(`${at.adminUrl}/healthz`)).status, 200, 'the admin listener answers')
  t.equal((await readyz(at)).status, 503, 'never ready: the issuer is unreachable')
  t.equal((await fetch(`${at.url}/api/x`)).status, 401, 'token-less requests refused all the same')
  t.equal((await p.waitForLog((l) => l.msg === 'gateway listening', 1000)).msg, 'gateway listening', 'waitForLog finds a line already logged')
  p.child.kill('SIGTERM')
  t.match(await p.exited, { code: 0, signal: null }, 'exited: the code after SIGTERM')
  await t.rejects(p.waitForLog(() => false, 5000), /exited \(0\) before the log line/, 'waitForLog fails once the process has exited')
  t.match(p.stdout(), /"msg":"shutdown complete"/, 'stdout captured')

  const bad = spawnGateway(t, { PORT: 'abc' })
  t.equal((await bad.exited).code, 1, 'an invalid configuration exits 1')
  t.match(bad.stderr(), /server\.port \(PORT\)/, 'stderr captured')

  let held: GatewayProcess | undefined
  await t.test('killed when its test ends', async (tt) => {
    held = spawnGateway(tt, { ...(await unreachableBackendsEnv()).env, LOG_LEVEL: 'info' })
    await held.listening()
  })
  t.equal((await held?.exited)?.signal, 'SIGKILL')

  let prlimit = true
  try { execFileSync('prlimit', ['--version'], { stdio: 'ignore' }) } catch { prlimit = false }
  await t.test('a wrapper command runs node', { skip: prlimit ? false : 'prlimit (util-linux) is not installed' }, async (tt) => {
    const w = spawnGateway(tt, { ...(await unreachableBackendsEnv()).env, LOG_LEVEL: 'info' }, { wrapper: ['prlimit', '--nofile=300:300'] })
    await w.listening()
    tt.match(readFileSync(`/proc/${String(w.child.pid)}/limits`, 'utf8'), /Max open files\s+300\s+300/, 'the gateway runs under prlimit')
  })

  await t.test('entry src: src/server.ts through the TypeScript loader', async (tt) => {
    const s = spawnGateway(tt, { ...(await unreachableBackendsEnv()).env, LOG_LEVEL: 'info' }, { entry: 'src' })
    const urls = await s.listening(20_000)
    tt.equal((await fetch(`${urls.adminUrl}/healthz`)).status, 200, 'listening and answering')
  })
})

t.test('ws-client helpers: upgrade, exchange, connect, refusal, echo', async (t) => {
  const { issuer, upstream } = await startBackends(t)
  const g = await startGateway(t, issuer, upstream)
  const token = await issuer.token({ sub: 'ws-client-user' })
  const auth = { authorization: `Bearer ${token}` }

  const open = await upgrade(t, `${g.wsUrl}/ws/a`, { headers: auth })
  t.match(open, { kind: 'open', status: 101, protocol: '' }, 'upgrade: open')
  if (open.kind === 'open') t.equal(await exchange(open.ws, 'hi'), 'hi', 'exchange: the echo of what was sent')
  const negotiated = await upgrade(t, `${g.wsUrl}/ws/a`, { protocols: ['bearer', token, 'chat.v1'] })
  t.match(negotiated, { kind: 'open', protocol: 'chat.v1' }, 'with subprotocols')
  const refused = await upgrade(t, `${g.wsUrl}/ws/a`)
  t.match(refused, { kind: 'refused', status: 401, upgraded: false }, 'upgrade: refused with the HTTP status')
  if (refused.kind === 'refused') {
    t.match(refused.headers['www-authenticate'], /^Bearer /, 'its headers')
    t.match(JSON.parse(refused.body), { error: 'unauthorized' }, 'its whole body')
  }
  let kept: WebSocket | undefined
  await t.test('upgrade: the socket is terminated when its test ends', async (tt) => {
    const o = await upgrade(tt, `${g.wsUrl}/ws/b`, { headers: auth })
    if (o.kind === 'open') kept = o.ws
    tt.equal(kept?.readyState, WebSocket.OPEN)
  })
  t.not(kept?.readyState, WebSocket.OPEN, 'no longer open')

  const c = await connect(g, token)
  t.match(c.path, /^\/ws\/[0-9a-f-]{36}$/, 'connect: a path of its own')
  await echo(c, 'same')
  await echo(c, 'same')
  t.strictSame(c.texts, ['same', 'same'], 'echo waits for one more copy each time; texts collects')
  const viaQuery = await connect(g, token, { carrier: 'query' })
  await until(() => upstream.wsConnections.some((r) => r.url === viaQuery.path), 3000, 'the app got the query connection')
  const viaProtocol = await connect(g, token, { carrier: 'protocol' })
  t.equal(viaProtocol.ws.protocol, 'bearer', 'carrier protocol: the token in the bearer subprotocol')
  await t.rejects(connect(g, 'garbage'), /upgrade refused with 401/, 'connect rejects a refused upgrade')
  c.ws.send('close:4001:bye')
  t.match(await c.closed, { code: 4001, reason: 'bye' }, 'closed: the code and reason the client saw')
  t.type((await c.closed).at, 'number')

  t.match(await refusal(g, 'garbage'), { status: 401, upgraded: false }, 'refusal: the status, before any 101')
  await t.rejects(refusal(g, token), /the upgrade was accepted/, 'refusal rejects an upgrade that opens')
  for (const x of [viaQuery, viaProtocol]) x.ws.close()
  if (open.kind === 'open') open.ws.close()
  if (negotiated.kind === 'open') negotiated.ws.close()
})

t.test('units: ALICE, forwardContext, auditedRequest', async (t) => {
  t.match(ALICE, { sub: 'f3a1-user', username: 'alice', roles: ['admin', 'app:read'] })
  t.strictSame(forwardContext(), {
    identity: ALICE,
    requestId: 'req-1',
    clientIp: '203.0.113.7',
    remoteAddress: '10.1.2.3',
    protocol: 'https',
    host: 'gw.example.com',
    trustProxy: false,
    forwardAuthorization: false
  })
  t.match(forwardContext({ identity: null, trustProxy: true }), { identity: null, trustProxy: true, host: 'gw.example.com' }, 'fields replaced, the rest kept')
  t.match(auditedRequest(), { id: 'req-1', ip: '203.0.113.7', method: 'GET', url: '/ws/chat?room=1' })
  t.match(auditedRequest({ url: '/x' }), { url: '/x', id: 'req-1' })
})

t.test('freePort: a bindable port below the ephemeral range, so a listen(0) elsewhere cannot take it', async (t) => {
  const ports = await Promise.all(Array.from({ length: 20 }, async () => await freePort()))
  for (const p of ports) t.ok(p >= 20_000 && p <= 32_767, `${p} is in 20000-32767`)
  t.ok(new Set(ports).size > 1, 'ports differ')
})
