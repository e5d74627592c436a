// OIDC Back-Channel Logout (OpenID Connect Back-Channel Logout 1.0) end to end, on real sockets: a real issuer that
// signs (and, through issuer.backchannelLogout, itself POSTs) logout tokens, a real echo app, real Redis, gateways
// in-process, two of them sharing one key prefix = two replicas.
//   - config: BACKCHANNEL_LOGOUT_PATH unset = off (the path is an ordinary proxied path needing a token);
//     BACKCHANNEL_LOGOUT_AUDIENCE (default: the JWT_AUDIENCE values); BACKCHANNEL_LOGOUT_LISTENER public | admin;
//   - POST <path>, form body logout_token=<jwt>: 200 `Cache-Control: no-store`, no bearer needed, never reaches the
//     app; anything invalid (spec section 2.6) 400 {"error":"invalid_request",...} `Cache-Control: no-store`, and
//     nothing revoked;
//   - a logout token with `sid` revokes every token carrying that sid on every replica (401 invalid_token, audit
//     reason revoked) and closes their WebSockets with 1008 "session ended" within 1 s; the user's other sessions
//     keep working; with `sub` only, every token of that sub issued at or before its `iat`;
//   - a `jti` is accepted once, across replicas;
//   - one audit line (event "logout") and one resonance_backchannel_logouts_total count per request;
//   - provider-driven: oidc-provider POSTs the logout token itself; the time from its POST to the WebSocket close on
//     the other replica is reported (t.comment);
//   - a real login session (issuer.login: the authorization code flow through the provider's development interactions):
//     ending it at the provider (end_session, logout=yes) makes the provider POST the logout token; the time from the
//     confirmation to the WebSocket close on the other replica is reported (t.comment);
//   - Redis down: the receiving replica applies the logout to itself and answers 400 temporarily_unavailable.
// One RATE_LIMIT_KEY_PREFIX per gateway group on the shared Redis; only those keys are deleted.
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import WebSocket from 'ws'
import {
  BACKCHANNEL_LOGOUT_EVENT,
  LOGOUT_CLIENT_ID,
  LOGOUT_SUB_ONLY_CLIENT_ID,
  randomSub
} from './helpers/issuer.js'
import { flipSignatureChar, foreignRsaKey, forgeToken } from './helpers/forge.js'
import { getAs, startBackends, startGateway, untilReady, type Answer, type TestGateway } from './helpers/gateway.js'
import { ownRedis, sharedRedis } from './helpers/redis.js'
import { connect, echo, refusal, type Conn } from './helpers/ws-client.js'
import { audits, claims, pingPong, until, within } from './helpers/wait.js'

const PATH = '/backchannel-logout'
const FORM = 'application/x-www-form-urlencoded'
/** The login clients the issuer's logout tokens are addressed to (Keycloak: the client, not the API). */
const CLIENT_IDS = `${LOGOUT_CLIENT_ID},${LOGOUT_SUB_ONLY_CLIENT_ID}`

const { issuer, upstream } = await startBackends(t)
// Deleted after every subtest and its gateways ended: this file's prefixes only.
const { url: redis, freshPrefix } = await sharedRedis(t)

// --- helpers -----------------------------------------------------------------------------------------------------------

/** A gateway with the endpoint at PATH accepting CLIENT_IDS; an undefined value in `env` leaves that variable unset. */
async function gateway (tt: Test, prefix: string, over: Record<string, string | undefined> = {}): Promise<TestGateway> {
  const env: Record<string, string> = {}
  for (const [k, v] of Object.entries({ REDIS_URL: redis, RATE_LIMIT_KEY_PREFIX: prefix, BACKCHANNEL_LOGOUT_PATH: PATH, BACKCHANNEL_LOGOUT_AUDIENCE: CLIENT_IDS, ...over })) {
    if (v !== undefined) env[k] = v
  }
  const g = await startGateway(tt, issuer, upstream, { env })
  await untilReady(g)
  return g
}

/** Two replicas sharing one Redis prefix. */
async function replicas (tt: Test, env: Record<string, string | undefined> = {}): Promise<[TestGateway, TestGateway]> {
  const prefix = freshPrefix()
  return [await gateway(tt, prefix, env), await gateway(tt, prefix, env)]
}

/**
 * POST `logout_token=<token>` to `url` (a listener's base URL; PATH appended) as the issuer does, no bearer. `body`
 * replaces the form as sent; `type` replaces the content type (null: none).
 */
async function postLogout (url: string, token: string | undefined, opts: { body?: string, type?: string | null, path?: string } = {}): Promise<Answer> {
  const headers: Record<string, string> = {}
  const type = opts.type === undefined ? FORM : opts.type
  if (type !== null) headers['content-type'] = type
  const body = opts.body ?? (token === undefined ? '' : new URLSearchParams({ logout_token: token }).toString())
  // bytes, not a string: fetch would add text/plain to a string body sent without a content type
  const res = await fetch(`${url}${opts.path ?? PATH}`, { method: 'POST', headers, body: Buffer.from(body), signal: AbortSignal.timeout(5000) })
  return { status: res.status, headers: res.headers, body: await res.text() }
}

/** Requests the app received on `path` (query ignored). */
function appHits (path = PATH): number {
  return upstream.requests.filter((r) => r.url.split('?')[0] === path).length
}

/** resonance_backchannel_logouts_total: the accepted series, and the sum of every other result's. */
async function logoutCounts (g: TestGateway): Promise<{ accepted: number, refused: number }> {
  const text = await g.gw.metrics.registry.metrics()
  const out = { accepted: 0, refused: 0 }
  for (const line of text.split('\n')) {
    const m = /^resonance_backchannel_logouts_total\{([^}]*)\} (\S+)$/.exec(line)
    if (m === null) continue
    if (/(^|,)result="accepted"(,|$)/.test(m[1] ?? '')) out.accepted += Number(m[2])
    else out.refused += Number(m[2])
  }
  return out
}

function logoutAudits (g: TestGateway, match: Record<string, unknown> = {}): Array<Record<string, unknown>> {
  return audits(g, { event: 'logout', ...match })
}

/** 200, `Cache-Control: no-store`. */
function accepted (t: Test, res: Answer, what: string): void {
  t.equal(res.status, 200, `${what}: 200`)
  t.match(res.headers.get('cache-control'), /\bno-store\b/, `${what}: Cache-Control: no-store`)
}

/** 400, JSON {"error":"invalid_request","error_description":<text>}, `Cache-Control: no-store`; returns the description. */
function refused (t: Test, res: Answer, what: string): string | undefined {
  t.equal(res.status, 400, `${what}: 400`)
  t.match(res.headers.get('cache-control'), /\bno-store\b/, `${what}: Cache-Control: no-store`)
  t.match(res.headers.get('content-type'), /^application\/json\b/, `${what}: JSON`)
  let body: { error?: unknown, error_description?: unknown } = {}
  try { body = JSON.parse(res.body) as typeof body } catch {}
  t.equal(body.error, 'invalid_request', `${what}: error invalid_request`)
  t.ok(typeof body.error_description === 'string' && body.error_description !== '', `${what}: an error_description`)
  return typeof body.error_description === 'string' ? body.error_description : undefined
}

/** A user's login session: an access token carrying `sid`, as Keycloak issues them (azp = the login client). */
async function session (sub: string, sid = `sid-${randomUUID()}`): Promise<{ sub: string, sid: string, token: string }> {
  return { sub, sid, token: await issuer.token({ sub, sid }) }
}

/** The connection is still open and usable: a pong orders after any close frame sent before it, then an echo. */
async function stillOpen (t: Test, c: Conn, what: string): Promise<void> {
  const outcome = await Promise.race([
    pingPong(c.ws).then(() => 'open'),
    c.closed.then((cl) => `closed with ${cl.code} ${JSON.stringify(cl.reason)}`)
  ])
  t.equal(outcome, 'open', `${what}: still open`)
  if (outcome !== 'open') return
  t.equal(c.ws.readyState, WebSocket.OPEN, `${what}: open after the pong`)
  await echo(c, `still here ${c.path}`)
}

const nowSec = (): number => Math.floor(Date.now() / 1000)

// --- configuration -------------------------------------------------------------------------------------------------------

t.test('BACKCHANNEL_LOGOUT_PATH unset: off, the path is an ordinary proxied path that needs a token', async (t) => {
  const g = await gateway(t, freshPrefix(), { BACKCHANNEL_LOGOUT_PATH: undefined })
  const user = await session(randomSub('off'))
  const hits = appHits()
  const res = await postLogout(g.url, await issuer.logoutToken({ sub: user.sub, sid: user.sid }))
  t.equal(res.status, 401, 'no bearer: 401, as on any proxied path')
  t.match(res.headers.get('www-authenticate'), /^Bearer\b/)
  t.equal(appHits(), hits, 'the app saw nothing')
  const proxied = await fetch(`${g.url}${PATH}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${user.token}`, 'content-type': FORM },
    body: new URLSearchParams({ logout_token: await issuer.logoutToken({ sub: user.sub, sid: user.sid }) })
  })
  await proxied.arrayBuffer()
  t.equal(proxied.status, 200, 'with a bearer token: proxied')
  t.equal(appHits(), hits + 1, 'and the app received it')
  t.equal((await getAs(g, user.token)).status, 200, 'nothing was revoked')
  t.equal(logoutAudits(g).length, 0, 'no logout audit line')
})

t.test('the endpoint: valid -> 200 no-store, no bearer needed, never proxied; invalid -> 400 invalid_request no-store', async (t) => {
  const g = await gateway(t, freshPrefix())
  const hits = appHits()
  const user = await session(randomSub('shape'))
  accepted(t, await postLogout(g.url, await issuer.logoutToken({ sub: user.sub, sid: user.sid })), 'a valid logout token')
  const description = refused(t, await postLogout(g.url, 'not-a-jwt'), 'garbage')
  t.comment(`error_description of a malformed token: ${JSON.stringify(description)}`)
  t.equal(appHits(), hits, 'the app saw neither request')
  t.equal((await getAs(g, user.token)).status, 401, 'the logged-out session\'s token is refused')
})

t.test('BACKCHANNEL_LOGOUT_AUDIENCE: default the JWT_AUDIENCE values; when set, only its client ids', async (t) => {
  await t.test('unset: aud must name a JWT_AUDIENCE value', async (t) => {
    const g = await gateway(t, freshPrefix(), { BACKCHANNEL_LOGOUT_AUDIENCE: undefined })
    const a = await session(randomSub('aud'))
    const b = await session(randomSub('aud'))
    accepted(t, await postLogout(g.url, await issuer.logoutToken({ sub: a.sub, sid: a.sid, aud: issuer.audience })), `aud ${issuer.audience}`)
    t.equal((await getAs(g, a.token)).status, 401, 'and it took effect')
    refused(t, await postLogout(g.url, await issuer.logoutToken({ sub: b.sub, sid: b.sid, aud: LOGOUT_CLIENT_ID })), `aud ${LOGOUT_CLIENT_ID}`)
    t.equal((await getAs(g, b.token)).status, 200, 'not revoked')
  })

  await t.test('set: any of its client ids, in a string or an array aud; nothing else', async (t) => {
    const g = await gateway(t, freshPrefix(), { BACKCHANNEL_LOGOUT_AUDIENCE: 'other-app,resonance-web' })
    const a = await session(randomSub('aud'))
    const b = await session(randomSub('aud'))
    const c = await session(randomSub('aud'))
    accepted(t, await postLogout(g.url, await issuer.logoutToken({ sub: a.sub, sid: a.sid, aud: 'other-app' })), 'aud other-app')
    accepted(t, await postLogout(g.url, await issuer.logoutToken({ sub: b.sub, sid: b.sid, aud: ['account', LOGOUT_CLIENT_ID] })), 'aud [account, resonance-web]')
    t.equal((await getAs(g, a.token)).status, 401)
    t.equal((await getAs(g, b.token)).status, 401)
    refused(t, await postLogout(g.url, await issuer.logoutToken({ sub: c.sub, sid: c.sid, aud: issuer.audience })), 'aud = JWT_AUDIENCE, not listed')
    t.equal((await getAs(g, c.token)).status, 200, 'not revoked')
  })
})

t.test('BACKCHANNEL_LOGOUT_LISTENER=admin: served on the admin listener only', async (t) => {
  const [a, b] = await replicas(t, { BACKCHANNEL_LOGOUT_LISTENER: 'admin' })
  const user = await session(randomSub('adminlistener'))
  const hits = appHits()
  const onPublic = await postLogout(a.url, await issuer.logoutToken({ sub: user.sub, sid: user.sid }))
  t.equal(onPublic.status, 401, 'on the public listener: an ordinary path, no bearer -> 401')
  t.equal((await getAs(b, user.token)).status, 200, 'not revoked')
  accepted(t, await postLogout(a.adminUrl, await issuer.logoutToken({ sub: user.sub, sid: user.sid })), 'on the admin listener')
  t.equal((await getAs(a, user.token)).status, 401, 'revoked on A')
  // B learns it over Redis pub/sub: awaited (at most 1 s), as in the variants below; 'at once' is the sid test's claim
  await until(async () => (await getAs(b, user.token)).status === 401, 1000, 'and on B')
  t.pass('and on B')
  t.equal(appHits(), hits, 'the app saw nothing')
})

// --- effects across two replicas ------------------------------------------------------------------------------------------

t.test('a logout token with sid: that session ends on both replicas; the user\'s other sessions keep working', async (t) => {
  const [a, b] = await replicas(t)
  const sub = randomSub('sid')
  const ended = await session(sub)
  const ended2 = await issuer.token({ sub, sid: ended.sid }) // a second (refreshed) token of the same session
  const other = await session(sub)
  const noSid = await issuer.token({ sub })

  const onB = await connect(b, ended.token)
  const onA = await connect(a, ended2)
  const otherOnB = await connect(b, other.token)
  const otherOnA = await connect(a, other.token)
  await echo(onB, 'before')
  t.equal((await getAs(b, ended.token)).status, 200, 'valid before')
  const before = { a: await logoutCounts(a), audits: logoutAudits(a).length }
  const hits = appHits()

  const started = Date.now()
  const res = await postLogout(a.url, await issuer.logoutToken({ sub, sid: ended.sid }))
  accepted(t, res, 'the logout token, on A')
  // HTTP first, "at once": no waiting on either replica
  const answers = await Promise.all([getAs(a, ended.token), getAs(b, ended.token), getAs(a, ended2), getAs(b, ended2)])
  t.same(answers.map((r) => r.status), [401, 401, 401, 401], 'both tokens of the session refused on A and B at once')
  t.match(answers[1]?.headers.get('www-authenticate'), /error="invalid_token"/, 'WWW-Authenticate: invalid_token')
  t.equal(audits(b, { event: 'auth_failure', reason: 'revoked', transport: 'http', sub, status: 401 }).length, 2, 'HTTP refusals audited on B: revoked')
  t.equal(audits(a, { event: 'auth_failure', reason: 'revoked', transport: 'http', sub, status: 401 }).length, 2, 'and on A')

  const closedB = await within(onB.closed, 1500, 'the session\'s WebSocket on B closed')
  t.ok(closedB.at - started <= 1000, `B closed it ${closedB.at - started} ms after the logout request`)
  t.match(closedB, { code: 1008, reason: 'session ended' }, 'on B: 1008 "session ended"')
  t.match(await within(onA.closed, 1500, 'on A'), { code: 1008, reason: 'session ended' }, 'on A too')
  await until(() => upstream.wsConnections.find((r) => r.url === onB.path)?.closed !== undefined, 2000, 'the app side closed too')
  t.match(await refusal(b, ended.token), { status: 401, upgraded: false }, 'a new upgrade with the session\'s token: 401 before any 101')

  await stillOpen(t, otherOnB, 'another session of the same user on B')
  await stillOpen(t, otherOnA, 'on A')
  t.equal((await getAs(a, other.token)).status, 200, 'another sid of the same user works on A')
  t.equal((await getAs(b, other.token)).status, 200, 'and on B')
  t.equal((await getAs(b, noSid)).status, 200, 'a token of the same user without sid works')

  t.equal(appHits(), hits, 'the logout request never reached the app')
  t.match(logoutAudits(a).slice(before.audits), [{ event: 'logout', result: 'accepted', sub, sid: ended.sid }], 'one audit line on A')
  t.equal(logoutAudits(a).length - before.audits, 1, 'exactly one')
  t.equal((await logoutCounts(a)).accepted - before.a.accepted, 1, 'resonance_backchannel_logouts_total{result="accepted"} + 1')
  t.equal((await logoutCounts(a)).refused, before.a.refused, 'no refusal counted')

  // the same session logged out again (another logout token, another jti): already logged out counts as success (2.7)
  accepted(t, await postLogout(b.url, await issuer.logoutToken({ sub, sid: ended.sid })), 'a second logout of the same session, on B')
  for (const c of [otherOnA, otherOnB]) c.ws.close()
})

t.test('a logout token with sub only: that user\'s tokens issued at or before its iat are refused, later ones work', async (t) => {
  const [a, b] = await replicas(t)
  const sub = randomSub('subonly')
  const old1 = await issuer.token({ sub, sid: `sid-${randomUUID()}` })
  const old2 = await issuer.token({ sub })
  const bystander = await issuer.token({ sub: randomSub('bystander'), sid: `sid-${randomUUID()}` })
  const onB = await connect(b, old1)
  const bystanderOnB = await connect(b, bystander)
  const iat = nowSec()
  t.ok(claims(old1).iat <= iat && claims(old2).iat <= iat, 'both tokens were issued at or before the logout token\'s iat')

  const started = Date.now()
  const res = await postLogout(a.url, await issuer.logoutToken({ sub, sid: undefined, aud: LOGOUT_SUB_ONLY_CLIENT_ID, iat, exp: iat + 120 }))
  accepted(t, res, 'a sub-only logout token')
  const answers = await Promise.all([getAs(a, old1), getAs(b, old1), getAs(a, old2), getAs(b, old2)])
  t.same(answers.map((r) => r.status), [401, 401, 401, 401], 'every earlier token of the user refused on A and B')
  t.match(answers[3]?.headers.get('www-authenticate'), /error="invalid_token"/)
  t.equal(audits(b, { event: 'auth_failure', reason: 'revoked', transport: 'http', sub, status: 401 }).length, 2, 'both refusals on B audited: revoked')
  const closed = await within(onB.closed, 1500, 'the user\'s WebSocket on B closed')
  t.ok(closed.at - started <= 1000, `closed ${closed.at - started} ms after the logout request`)
  t.equal(closed.code, 1008, `1008 (reason ${JSON.stringify(closed.reason)})`)
  await stillOpen(t, bystanderOnB, 'another user\'s connection')
  t.match(logoutAudits(a, { result: 'accepted', sub }), [{ event: 'logout' }], 'audited on A')
  t.equal(logoutAudits(a, { sub })[0]?.sid, undefined, 'with no sid')

  // time-based by nature: iat has a 1 s resolution, so the clock must pass the next second
  await sleep(Math.max(0, (iat + 1) * 1000 + 100 - Date.now()))
  const fresh = await issuer.token({ sub, sid: `sid-${randomUUID()}` })
  t.ok(claims(fresh).iat > iat, 'issued after the logout token\'s iat')
  t.equal((await getAs(a, fresh)).status, 200, 'a later token works on A')
  t.equal((await getAs(b, fresh)).status, 200, 'and on B')
  const c = await connect(b, fresh)
  await stillOpen(t, c, 'its WebSocket')
  c.ws.close()
  bystanderOnB.ws.close()
})

// --- validation (spec section 2.6) ------------------------------------------------------------------------------------------

t.test('invalid logout requests: 400, audited, counted, and nothing revoked', async (t) => {
  const [a, b] = await replicas(t)
  const sub = randomSub('victim')
  const victim = await session(sub)
  const onB = await connect(b, victim.token)
  const target = { sub, sid: victim.sid }
  const now = nowSec()
  const foreign = await foreignRsaKey()
  const valid = await issuer.logoutToken(target)
  const logoutPayload = claims(valid) as unknown as Record<string, unknown>

  const cases: Array<[string, () => Promise<Answer>]> = [
    ['a forged signature', async () => await postLogout(a.url, flipSignatureChar(await issuer.logoutToken(target)))],
    ['a foreign key with the issuer\'s kid', async () => await postLogout(a.url, await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid: issuer.currentKid(), typ: 'logout+jwt' }, payload: { ...logoutPayload, jti: randomUUID() } }))],
    ['alg none', async () => await postLogout(a.url, await forgeToken({ alg: 'none', header: { typ: 'logout+jwt' }, payload: { ...logoutPayload, jti: randomUUID() } }))],
    ['HS256 keyed with the public key', async () => await postLogout(a.url, await forgeToken({ alg: 'HS256', key: issuer.publicKeyPem(), header: { kid: issuer.currentKid(), typ: 'logout+jwt' }, payload: { ...logoutPayload, jti: randomUUID() } }))],
    ['a wrong iss', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, iss: issuer.issuer.replace(/\/realms\/.*/, '/realms/evil') }))],
    ['a wrong aud', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, aud: 'someone-else' }))],
    ['no aud', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, aud: undefined }))],
    ['no events', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, events: undefined }))],
    ['events without the back-channel-logout member', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, events: { 'http://schemas.openid.net/event/other': {} } }))],
    ['the events member is not an object', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, events: { [BACKCHANNEL_LOGOUT_EVENT]: true } }))],
    ['events is not an object', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, events: BACKCHANNEL_LOGOUT_EVENT }))],
    ['a nonce', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, nonce: 'n-0S6_WzA2Mj' }))],
    ['expired', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, iat: now - 3600, exp: now - 3480 }))],
    ['no iat', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, iat: undefined }))],
    ['no jti', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, jti: undefined }))],
    ['neither sid nor sub', async () => await postLogout(a.url, await issuer.logoutToken({ sid: undefined, sub: undefined }))],
    ['header typ at+jwt', async () => await postLogout(a.url, await issuer.logoutToken(target, { typ: 'at+jwt' }))],
    ['an access token (the user\'s own)', async () => await postLogout(a.url, victim.token)],
    ['an access token addressed to the login client', async () => await postLogout(a.url, await issuer.token({ sub, sid: victim.sid, audience: LOGOUT_CLIENT_ID }))],
    ['an ID-token-like payload (nonce, no events)', async () => await postLogout(a.url, await issuer.logoutToken({ ...target, events: undefined, nonce: 'n', typ: 'ID' }, { typ: 'JWT' }))],
    ['application/json', async () => await postLogout(a.url, undefined, { type: 'application/json', body: JSON.stringify({ logout_token: await issuer.logoutToken(target) }) })],
    ['text/plain', async () => await postLogout(a.url, await issuer.logoutToken(target), { type: 'text/plain' })],
    ['no content type', async () => await postLogout(a.url, await issuer.logoutToken(target), { type: null })],
    ['no logout_token field', async () => await postLogout(a.url, undefined, { body: new URLSearchParams({ token: await issuer.logoutToken(target) }).toString() })],
    ['an empty logout_token', async () => await postLogout(a.url, '')],
    ['an empty body', async () => await postLogout(a.url, undefined)],
    ['not a JWT', async () => await postLogout(a.url, 'definitely.not.ajwt')]
  ]

  const before = { counts: await logoutCounts(a), audits: logoutAudits(a).length }
  const hits = appHits()
  const descriptions = new Set<string>()
  for (const [what, send] of cases) {
    const description = refused(t, await send(), what)
    if (description !== undefined) descriptions.add(description)
  }
  t.comment(`error_description values: ${JSON.stringify([...descriptions])}`)
  t.equal(appHits(), hits, 'the app saw none of them')

  const lines = logoutAudits(a).slice(before.audits)
  t.equal(lines.length, cases.length, 'one audit line (event "logout") per request')
  t.notOk(lines.some((l) => l.result === 'accepted' || typeof l.result !== 'string' || l.result === ''), 'each with a failure reason as result')
  t.comment(`audit results: ${JSON.stringify([...new Set(lines.map((l) => l.result))])}`)
  t.notOk(a.rawLogs.some((l) => /eyJ[\w-]+\.eyJ/.test(l)), 'no token in the logs')
  const after = await logoutCounts(a)
  t.equal(after.accepted, before.counts.accepted, 'resonance_backchannel_logouts_total{result="accepted"} unchanged')
  t.equal(after.refused - before.counts.refused, cases.length, 'the non-accepted results count one per request')

  t.equal((await getAs(a, victim.token)).status, 200, 'the user\'s token still works on A')
  t.equal((await getAs(b, victim.token)).status, 200, 'and on B')
  await stillOpen(t, onB, 'the user\'s WebSocket on B')
  onB.ws.close()
})

t.test('a replayed logout token (same jti): 400, on the same replica and on the other', async (t) => {
  const [a, b] = await replicas(t)
  const user = await session(randomSub('replay'))
  const token = await issuer.logoutToken({ sub: user.sub, sid: user.sid })
  accepted(t, await postLogout(a.url, token), 'first time, on A')
  refused(t, await postLogout(a.url, token), 'again on A')
  refused(t, await postLogout(b.url, token), 'again on B (the jti is shared through Redis)')
  const onB = logoutAudits(b, { sub: user.sub, sid: user.sid })
  t.equal(onB.length, 1, 'B audits the replay')
  t.ok(onB[0]?.result !== undefined && onB[0].result !== 'accepted', `as refused (result ${JSON.stringify(onB[0]?.result)})`)
  t.ok((await logoutCounts(b)).refused >= 1, 'and counts it')

  // a jti is remembered per token, not per session: another logout token for the same session is fine
  accepted(t, await postLogout(b.url, await issuer.logoutToken({ sub: user.sub, sid: user.sid })), 'a new jti for the same session')
})

t.test('accepted variants, as Keycloak versions send them', async (t) => {
  const [a, b] = await replicas(t)
  const variants: Array<[string, (s: { sub: string, sid: string }) => Promise<Answer>]> = [
    ['header typ JWT (Keycloak before 25)', async (s) => await postLogout(a.url, await issuer.logoutToken(s, { typ: 'JWT' }))],
    ['no header typ', async (s) => await postLogout(a.url, await issuer.logoutToken(s, { typ: undefined }))],
    ['no exp (Keycloak before 22/23 patch releases)', async (s) => await postLogout(a.url, await issuer.logoutToken({ ...s, exp: undefined }))],
    ['sid without sub', async (s) => await postLogout(a.url, await issuer.logoutToken({ sid: s.sid, sub: undefined }))],
    ['events with revoke_offline_access, payload typ Logout, unknown claims', async (s) => await postLogout(a.url, await issuer.logoutToken({ ...s, typ: 'Logout', events: { [BACKCHANNEL_LOGOUT_EVENT]: {}, revoke_offline_access: true }, custom: { x: 1 } }))],
    ['content type with a charset', async (s) => await postLogout(a.url, await issuer.logoutToken(s), { type: `${FORM}; charset=UTF-8` })],
    ['extra form fields', async (s) => await postLogout(a.url, undefined, { body: new URLSearchParams({ state: 'x', logout_token: await issuer.logoutToken(s), other: 'y' }).toString() })]
  ]
  for (const [what, send] of variants) {
    const s = await session(randomSub('variant'))
    accepted(t, await send(s), what)
    // Cross-replica immediacy is the sid test's claim; here only that the variant took effect (pub/sub to B within 1 s).
    await until(async () => (await getAs(b, s.token)).status === 401, 1000, `${what}: the session's token is refused on B`)
    t.equal((await getAs(b, s.token)).status, 401, `${what}: the session's token is refused on B`)
  }
})

// --- provider-driven ----------------------------------------------------------------------------------------------------------

t.test('provider-driven: the issuer itself POSTs the logout token; the WebSocket on the other replica closes', async (t) => {
  const [a, b] = await replicas(t)
  t.teardown(() => issuer.setBackchannelLogoutUri(undefined))
  issuer.setBackchannelLogoutUri(`${a.url}${PATH}`)

  const ROUNDS = 5
  const figures: number[] = []
  for (let i = 0; i < ROUNDS; i++) {
    const user = await session(randomSub('kc'))
    const other = await session(user.sub)
    const onB = await connect(b, user.token)
    const otherOnB = await connect(b, other.token)
    await echo(onB, 'before')
    const result = await issuer.backchannelLogout({ sub: user.sub, sid: user.sid })
    t.match(result, { ok: true, status: 200, error: undefined }, `round ${i + 1}: the provider got 200`)
    const closed = await within(onB.closed, 1500, 'the WebSocket on B (the other replica) closed')
    t.match(closed, { code: 1008, reason: 'session ended' })
    const ms = closed.at - (result.postedAt ?? NaN)
    t.ok(ms <= 1000, `round ${i + 1}: closed ${ms} ms after the provider started its POST`)
    figures.push(ms)
    t.equal((await getAs(b, user.token)).status, 401, 'B refuses the session\'s token')
    await stillOpen(t, otherOnB, 'the user\'s other session')
    otherOnB.ws.close()
    t.match(logoutAudits(a, { sub: user.sub }), [{ result: 'accepted', sid: user.sid }], 'A audited the logout')
  }
  const sorted = [...figures].sort((x, y) => x - y)
  t.comment(`provider POST start -> WebSocket close on the other replica: ${sorted.join(', ')} ms ` +
    `(min ${sorted[0]}, median ${sorted[Math.floor(ROUNDS / 2)]}, max ${sorted[ROUNDS - 1]}; ${ROUNDS} rounds, loopback, in-process gateways)`)

  await t.test('sub-only client: every earlier token of the user', async (t) => {
    const sub = randomSub('kcsub')
    const token = await issuer.token({ sub, sid: `sid-${randomUUID()}` })
    const onB = await connect(b, token)
    const result = await issuer.backchannelLogout({ sub, clientId: LOGOUT_SUB_ONLY_CLIENT_ID })
    t.match(result, { ok: true, status: 200 }, 'the provider got 200')
    t.notOk('sid' in claims(result.logoutToken ?? '..'), 'the token it sent had no sid')
    t.equal((await within(onB.closed, 1500, 'closed on B')).code, 1008)
    t.equal((await getAs(b, token)).status, 401)
  })

  await t.test('a gateway that does not accept the client: the provider sees the 400', async (t) => {
    const strict = await gateway(t, freshPrefix(), { BACKCHANNEL_LOGOUT_AUDIENCE: 'some-other-client' })
    issuer.setBackchannelLogoutUri(`${strict.url}${PATH}`)
    const user = await session(randomSub('kcrefused'))
    const result = await issuer.backchannelLogout({ sub: user.sub, sid: user.sid })
    t.match(result, { ok: false, status: 400 })
    t.match(result.error, /^expected 200 OK from .*, got: 400 Bad Request$/, `the provider's error: ${result.error}`)
    t.equal((await getAs(strict, user.token)).status, 200, 'nothing revoked')
    const lines = logoutAudits(strict, { sub: user.sub })
    t.equal(lines.length, 1, 'audited')
    t.ok(lines[0]?.result !== undefined && lines[0].result !== 'accepted', `as refused (result ${JSON.stringify(lines[0]?.result)})`)
  })
})

t.test('a real login session ended at the provider (end_session): the provider POSTs the logout token to A; that session ends on A and B, the user\'s other session keeps working', async (t) => {
  const [a, b] = await replicas(t)
  t.teardown(() => issuer.setBackchannelLogoutUri(undefined))
  issuer.setBackchannelLogoutUri(`${a.url}${PATH}`)
  const sub = randomSub('login')

  const first = await issuer.login(sub)
  t.match(claims(first.accessToken), { sub, sid: first.sid, azp: LOGOUT_CLIENT_ID, aud: issuer.audience },
    'the access token of the login carries the provider\'s sid of the session')
  t.equal((await getAs(a, first.accessToken)).status, 200, 'the first session\'s token works on A')
  t.equal((await getAs(b, first.accessToken)).status, 200, 'and on B')
  const onB = await connect(b, first.accessToken)
  await echo(onB, 'before')

  const second = await issuer.login(sub)
  t.not(second.sid, first.sid, 'a second login of the same user: another session, another sid')
  t.equal((await getAs(a, second.accessToken)).status, 200, 'the second session\'s token works on A')
  t.equal((await getAs(b, second.accessToken)).status, 200, 'and on B')
  const secondOnB = await connect(b, second.accessToken)
  const hits = appHits()

  const ended = await first.logout()
  t.equal(ended.backchannel.length, 1, 'the provider made one back-channel POST (one client in the session)')
  const [post] = ended.backchannel
  t.match(post, { ok: true, status: 200, error: undefined }, 'A answered the provider 200')
  t.ok(post !== undefined && post.postedAt !== undefined && post.postedAt >= ended.confirmSentAt && post.postedAt <= ended.answeredAt,
    'the provider POSTed between the confirmation and its answer')
  t.match(claims(post?.logoutToken ?? '..'), { sub, sid: first.sid, aud: LOGOUT_CLIENT_ID }, 'its logout token: the user, the first session\'s sid')
  t.match(logoutAudits(a, { sub }), [{ result: 'accepted', sid: first.sid }], 'A received it (audited as accepted)')

  const answers = await Promise.all([getAs(a, first.accessToken), getAs(b, first.accessToken)])
  t.same(answers.map((r) => r.status), [401, 401], 'the first session\'s token: 401 on A and on B')
  t.match(answers[1]?.headers.get('www-authenticate'), /error="invalid_token"/, 'invalid_token')
  const closed = await within(onB.closed, 1500, 'the first session\'s WebSocket on B closed')
  t.match(closed, { code: 1008, reason: 'session ended' }, 'on B: 1008 "session ended"')
  const ms = closed.at - ended.confirmSentAt
  t.ok(ms <= 1000, `closed ${ms} ms after the logout confirmation was sent`)
  t.comment(`end_session confirmation sent -> WebSocket close on B (the other replica): ${ms} ms ` +
    `(the provider's POST to A started at +${(post?.postedAt ?? NaN) - ended.confirmSentAt} ms, ` +
    `A answered it at +${(post?.answeredAt ?? NaN) - ended.confirmSentAt} ms, the provider's 303 at +${ended.answeredAt - ended.confirmSentAt} ms)`)

  t.equal((await getAs(a, second.accessToken)).status, 200, 'the second session\'s token still works on A')
  t.equal((await getAs(b, second.accessToken)).status, 200, 'and on B')
  await stillOpen(t, secondOnB, 'the second session\'s WebSocket on B')
  t.equal(appHits(), hits, 'nothing reached the app')
  secondOnB.ws.close()
})

t.test('Redis down while a logout token arrives: applied on the receiving replica only, answered 400 temporarily_unavailable', async (t) => {
  const server = await ownRedis(t)
  const prefix = freshPrefix()
  const a = await gateway(t, prefix, { REDIS_URL: server.url })
  const b = await gateway(t, prefix, { REDIS_URL: server.url })
  const user = await session(randomSub('redisdown'))
  const onA = await connect(a, user.token)
  const onB = await connect(b, user.token)
  await echo(onA, 'before')

  await server.stop()
  await until(async () => (await a.gw.metrics.registry.getSingleMetricAsString('resonance_rate_limit_store_degraded')).endsWith(' 1'),
    5_000, 'A notices the outage')
  const res = await postLogout(a.url, await issuer.logoutToken({ sub: user.sub, sid: user.sid }))
  t.equal(res.status, 400, 'the specification\'s status for a logout that failed: 400')
  t.match(res.headers.get('cache-control'), /\bno-store\b/, 'Cache-Control: no-store')
  t.match(JSON.parse(res.body), { error: 'temporarily_unavailable', error_description: /this replica only/ }, 'says why')
  t.match(logoutAudits(a, { sub: user.sub }), [{ result: 'store_unavailable', sid: user.sid }], 'audited as store_unavailable')

  t.equal((await getAs(a, user.token)).status, 401, 'A, which received it, refuses the session at once')
  t.match(await within(onA.closed, 1500, 'the WebSocket on A closed'), { code: 1008, reason: 'session ended' }, 'and closes its WebSocket')
  t.equal((await getAs(b, user.token)).status, 200, 'B never learned it (documented: sign out again once Redis is back)')
  await stillOpen(t, onB, 'the WebSocket on B')

  // Redis back: a new logout of the session (a new logout token) reaches every replica.
  await ownRedis(t, server.port)
  await untilReady(b, 10_000, 'B ready again')
  await until(async () => (await a.gw.metrics.registry.getSingleMetricAsString('resonance_rate_limit_store_degraded')).endsWith(' 0'),
    10_000, 'A sees Redis again')
  accepted(t, await postLogout(a.url, await issuer.logoutToken({ sub: user.sub, sid: user.sid })), 'the next logout, Redis up')
  t.equal((await getAs(b, user.token)).status, 401, 'now B refuses the session too')
  t.match(await within(onB.closed, 1500, 'the WebSocket on B closed'), { code: 1008, reason: 'session ended' })
})
