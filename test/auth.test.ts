// Authentication through real sockets: one table row per rejection reason (status, RFC 6750 challenge, body, exactly
// one audit line, the reason counter, nothing reaches the app), then the accepted path and what the app receives,
// clock tolerance, Keycloak audience realities, role rules and their bypass attempts, the transport guard, and
// WebSocket upgrades.
import { randomUUID } from 'node:crypto'
import t, { type Test } from 'tap'
import { decodeJwt, generateKeyPair } from 'jose'
import { startIssuer, type TestIssuer } from './helpers/issuer.js'
import { claims, flipSignatureChar, foreignRsaKey, forgeToken } from './helpers/forge.js'
import { startUpstream, type TestUpstream } from './helpers/upstream.js'
import { sendVerbatim, startGateway, type LogLine, type TestGateway } from './helpers/gateway.js'
import { exchange, upgrade } from './helpers/ws-client.js'
import { AUTH_FAILURE_REASONS, type AuthFailureReason } from '../src/observability/metrics.js'

interface Answer {
  status: number
  headers: Record<string, string | undefined>
  body: string
}

const ROW_PATH = '/api/things'
const REALM_PREFIX = 'Bearer realm="resonance"'

// --- small real-socket helpers ---------------------------------------------------------------------------------------

async function get (url: string, headers: Record<string, string> = {}, method = 'GET'): Promise<Answer> {
  const res = await fetch(url, { method, headers })
  const body = await res.text()
  return { status: res.status, headers: Object.fromEntries(res.headers), body }
}

// --- metrics ---------------------------------------------------------------------------------------------------------

type Series = Map<string, number>

function parseMetrics (text: string, name: string): Series {
  const out: Series = new Map()
  for (const line of text.split('\n')) {
    if (!line.startsWith(name + '{')) continue
    const m = /^[^{]+\{([^}]*)\}\s+(\S+)$/.exec(line)
    if (m === null) continue
    const labels = [...(m[1] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((l) => `${l[1]}=${l[2]}`).sort().join(',')
    out.set(labels, Number(m[2]))
  }
  return out
}

async function authFailures (g: TestGateway): Promise<Series> {
  const res = await fetch(`${g.adminUrl}/metrics`)
  return parseMetrics(await res.text(), 'resonance_auth_failures_total')
}

/** Series whose value changed between two snapshots, with the difference. */
function moved (before: Series, after: Series): Record<string, number> {
  const out: Record<string, number> = {}
  for (const [k, v] of after) if (v !== (before.get(k) ?? 0)) out[k] = v - (before.get(k) ?? 0)
  return out
}

const seriesKey = (reason: string, transport: string): string => `reason=${reason},transport=${transport}`

// --- assertions shared by every denial --------------------------------------------------------------------------------

function auditsFor (g: TestGateway, reqId: string): LogLine[] {
  return g.audits().filter((l) => l.reqId === reqId)
}

function assertBody (tt: Test, a: Answer, expectError: string | undefined, secrets: string[]): void {
  tt.match(a.headers['content-type'], /^application\/json/, 'JSON body')
  tt.ok(a.body.length < 300, `body is small (${a.body.length} bytes)`)
  let body: Record<string, unknown> = {}
  try {
    body = JSON.parse(a.body) as Record<string, unknown>
  } catch {
    tt.fail(`body is not JSON: ${a.body}`)
  }
  tt.type(body.error, 'string', 'body has an error code')
  if (expectError !== undefined) tt.equal(body.error, expectError, 'body error matches the challenge')
  tt.same(Object.keys(body).filter((k) => k !== 'error' && k !== 'error_description'), [], 'no other body fields')
  tt.notMatch(a.body, /\bat [\w.<>]+ \(|node_modules|\bError\b|FST_|FAST_JWT|GW_|stack|\/src\/|\.ts:\d/,
    'no stack trace or internal text')
  for (const s of secrets) tt.notOk(a.body.includes(s), 'body does not echo the token')
}

interface Expect {
  status: number
  reason: AuthFailureReason
  /** `error` attribute of WWW-Authenticate; undefined = the challenge must have none. */
  error: 'invalid_token' | 'invalid_request' | undefined
  transport: 'http' | 'ws'
  reqId: string
  secrets: string[]
  method?: string
  path?: string
}

async function assertDenied (tt: Test, g: TestGateway, upstream: TestUpstream, a: Answer, before: Series, e: Expect): Promise<void> {
  tt.equal(a.status, e.status, `status ${e.status}`)
  const challenge = a.headers['www-authenticate']
  tt.ok(challenge?.startsWith(REALM_PREFIX), `WWW-Authenticate starts with ${REALM_PREFIX} (got ${String(challenge)})`)
  if (e.error === undefined) tt.notMatch(challenge ?? '', /error=/, 'no error attribute when no token was sent')
  else tt.match(challenge ?? '', `error="${e.error}"`, `error="${e.error}"`)
  assertBody(tt, a, e.error, e.secrets)
  tt.equal(a.headers['x-request-id'], e.reqId, 'the response carries our request id')

  const lines = auditsFor(g, e.reqId)
  tt.equal(lines.length, 1, 'exactly one audit line for the request')
  const [line] = lines
  tt.match(line, {
    event: 'auth_failure',
    reason: e.reason,
    transport: e.transport,
    ip: '127.0.0.1',
    method: e.method ?? 'GET',
    path: e.path ?? ROW_PATH,
    status: e.status
  }, 'audit fields')
  tt.notOk(String(line?.path).includes('?'), 'audit path has no query')
  const rawLine = JSON.stringify(line)
  for (const s of e.secrets) tt.notOk(rawLine.includes(s), 'audit line does not hold the token')

  tt.same(moved(before, await authFailures(g)), { [seriesKey(e.reason, e.transport)]: 1 },
    `only resonance_auth_failures_total{reason="${e.reason}",transport="${e.transport}"} moved, by 1`)
  tt.equal(upstream.requests.length, 0, 'the app never saw the request')
  tt.equal(upstream.wsConnections.length, 0, 'the app never saw a WebSocket')
}

// --- shared fixtures ---------------------------------------------------------------------------------------------------

const issuer: TestIssuer = await startIssuer()
t.teardown(() => issuer.close())

async function upstreamFor (tt: Test): Promise<TestUpstream> {
  const upstream = await startUpstream()
  tt.teardown(() => upstream.close())
  return upstream
}

/** Claims of a real issuer token, to re-sign with changes (every field the issuer would put there). */
async function realClaims (sub = 'carol'): Promise<Record<string, unknown>> {
  return { ...decodeJwt(await issuer.token({ sub })) }
}

const nowSec = (): number => Math.floor(Date.now() / 1000)

// --- the rejection table ------------------------------------------------------------------------------------------------

interface Row {
  name: string
  reason: AuthFailureReason
  error: 'invalid_token' | 'invalid_request' | undefined
  status?: number
  /** Authorization header value; undefined = none. */
  authorization?: () => Promise<string | undefined>
  /** Sent as a WebSocket upgrade instead of fetch (a second token location needs one). */
  ws?: (reqId: string) => Promise<{ url: string, headers: Record<string, string>, secrets: string[] }>
}

t.test('rejection table: one row per reason, through real sockets', async (t) => {
  const upstream = await upstreamFor(t)
  const g = await startGateway(t, issuer, upstream)
  const foreign = await foreignRsaKey()
  const ec = await generateKeyPair('ES256', { extractable: true })
  const bearer = (tok: string): string => `Bearer ${tok}`

  const rows: Row[] = [
    { name: 'no Authorization header', reason: 'missing_token', error: undefined },
    { name: 'Authorization: Basic', reason: 'missing_token', error: undefined, authorization: async () => 'Basic ' + Buffer.from('alice:secret').toString('base64') },
    { name: 'Bearer abc (not a JWT)', reason: 'malformed', error: 'invalid_token', authorization: async () => 'Bearer abc' },
    { name: 'Bearer a.b.c (garbage base64)', reason: 'malformed', error: 'invalid_token', authorization: async () => 'Bearer a.b.c' },
    { name: 'Bearer with garbage JSON segments', reason: 'malformed', error: 'invalid_token', authorization: async () => 'Bearer eyJhbGciOi.eyJzdWIiOiJ4.c2lnbmF0dXJl' },
    { name: 'empty Bearer', reason: 'malformed', error: 'invalid_token', authorization: async () => 'Bearer ' },
    {
      name: 'expired (real key)',
      reason: 'expired',
      error: 'invalid_token',
      authorization: async () => bearer(await issuer.sign({ ...await realClaims(), iat: nowSec() - 600, exp: nowSec() - 60 }))
    },
    {
      name: 'not yet valid: nbf 60 s ahead (real key)',
      reason: 'not_yet_valid',
      error: 'invalid_token',
      authorization: async () => bearer(await issuer.sign({ ...await realClaims(), nbf: nowSec() + 60 }))
    },
    {
      name: 'wrong issuer (real key)',
      reason: 'wrong_issuer',
      error: 'invalid_token',
      authorization: async () => bearer(await issuer.sign({ ...await realClaims(), iss: issuer.issuer.replace(/\/realms\/.*/, '/realms/evil') }))
    },
    {
      name: 'wrong audience (real issuer token)',
      reason: 'wrong_audience',
      error: 'invalid_token',
      authorization: async () => bearer(await issuer.token({ sub: 'dave', audience: 'some-other-api' }))
    },
    {
      name: 'bad signature: one signature char flipped',
      reason: 'bad_signature',
      error: 'invalid_token',
      authorization: async () => bearer(flipSignatureChar(await issuer.token({ sub: 'erin' })))
    },
    {
      name: 'bad signature: foreign key carrying the real kid',
      reason: 'bad_signature',
      error: 'invalid_token',
      authorization: async () => bearer(await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid: issuer.currentKid() }, payload: claims(issuer) }))
    },
    {
      name: 'alg none',
      reason: 'alg_not_allowed',
      error: 'invalid_token',
      authorization: async () => bearer(await forgeToken({ alg: 'none', header: { kid: issuer.currentKid() }, payload: claims(issuer) }))
    },
    {
      name: 'HS256 keyed with the issuer public PEM, real kid (alg confusion)',
      reason: 'alg_not_allowed',
      error: 'invalid_token',
      authorization: async () => bearer(await forgeToken({ alg: 'HS256', key: issuer.publicKeyPem(), header: { kid: issuer.currentKid() }, payload: claims(issuer) }))
    },
    {
      name: 'ES256 when only RS256 is allowed',
      reason: 'alg_not_allowed',
      error: 'invalid_token',
      authorization: async () => bearer(await forgeToken({ alg: 'ES256', key: ec.privateKey, header: { kid: issuer.currentKid() }, payload: claims(issuer) }))
    },
    {
      name: 'unknown kid',
      reason: 'unknown_kid',
      error: 'invalid_token',
      authorization: async () => bearer(await forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid: 'no-such-kid' }, payload: claims(issuer) }))
    },
    {
      name: 'missing sub (real key)',
      reason: 'missing_claim',
      error: 'invalid_token',
      authorization: async () => {
        const c = await realClaims()
        delete c.sub
        return bearer(await issuer.sign(c))
      }
    },
    {
      name: 'missing exp (real key)',
      reason: 'missing_claim',
      error: 'invalid_token',
      authorization: async () => {
        const c = await realClaims()
        delete c.exp
        return bearer(await issuer.sign(c))
      }
    },
    {
      name: 'ID token (typ "ID", real key)',
      reason: 'wrong_token_type',
      error: 'invalid_token',
      authorization: async () => bearer(await issuer.sign({ ...await realClaims(), typ: 'ID', nonce: 'n-0S6_WzA2Mj', auth_time: nowSec() }))
    },
    {
      name: 'two tokens: Authorization header and ?access_token= on an upgrade',
      reason: 'multiple_tokens',
      error: 'invalid_request',
      status: 400,
      ws: async (reqId) => {
        const tok = await issuer.token({ sub: 'frank' })
        return {
          url: `${g.wsUrl}${ROW_PATH}?access_token=${tok}`,
          headers: { authorization: bearer(tok), 'x-request-id': reqId },
          secrets: [tok]
        }
      }
    }
  ]

  // every reason has a row here, except those that need another setup: insecure_transport and invalid_path (below),
  // jwks_unavailable (jwks.test.ts), revoked (needs a revocation; the revocation tests own it)
  const elsewhere = new Set<string>(['insecure_transport', 'invalid_path', 'jwks_unavailable', 'revoked'])
  const covered = new Set<string>(rows.map((r) => r.reason))
  t.same((AUTH_FAILURE_REASONS as readonly string[]).filter((r) => !covered.has(r) && !elsewhere.has(r)), [],
    'no AUTH_FAILURE_REASONS entry lacks a rejection test')

  for (const [i, row] of rows.entries()) {
    await t.test(row.name, async (tt) => {
      upstream.reset()
      const reqId = `row-${i}-${randomUUID()}`
      const before = await authFailures(g)
      if (row.ws !== undefined) {
        const req = await row.ws(reqId)
        const out = await upgrade(tt, req.url, { headers: req.headers })
        if (out.kind !== 'refused') return tt.fail('the upgrade was accepted')
        tt.notOk(out.upgraded, 'no 101')
        await assertDenied(tt, g, upstream, out, before, {
          status: row.status ?? 401, reason: row.reason, error: row.error, transport: 'ws', reqId, secrets: req.secrets
        })
        return
      }
      const authorization = await row.authorization?.()
      const headers: Record<string, string> = { 'x-request-id': reqId }
      if (authorization !== undefined) headers.authorization = authorization
      const a = await get(`${g.url}${ROW_PATH}?page=2&q=x`, headers)
      const token = authorization?.replace(/^\S+ ?/, '') ?? ''
      await assertDenied(tt, g, upstream, a, before, {
        status: row.status ?? 401,
        reason: row.reason,
        error: row.error,
        transport: 'http',
        reqId,
        secrets: token.length > 8 ? [token, token.split('.')[2] ?? token].filter((s) => s.length > 8) : []
      })
    })
  }

  await t.test('invalid path (with path rules configured): refused, audited, never forwarded', async (tt) => {
    const up = await upstreamFor(tt)
    const g2 = await startGateway(tt, issuer, up, { yaml: 'auth:\n  publicPaths: [\'/public/**\']\n' })
    const token = await issuer.token({ sub: 'ivan' })
    for (const [path, auditPath] of [
      ['/../api/x', '/../api/x'], // climbs above the root
      ['/%2e%2e/api/x', '/%2e%2e/api/x'], // the same, encoded
      ['/api/%00/x', '/api/%00/x'], // NUL
      // bad percent-encoding: Fastify's router refuses it before any hook (FST_ERR_BAD_URL); the gateway must still
      // answer with its own small body, audit it, and never echo the request target (it may hold ?access_token=)
      [`/api/%zz?access_token=${token}`, '/api/%zz']
    ] as const) {
      await tt.test(path.replace(token, '<token>'), async (t3) => {
        up.reset()
        const reqId = `badpath-${randomUUID()}`
        const before = await authFailures(g2)
        const a = await sendVerbatim(g2.url, 'GET', path, { authorization: `Bearer ${token}`, 'x-request-id': reqId })
        t3.equal(a.status, 400)
        assertBody(t3, a, 'invalid_request', [token, token.split('.')[2] ?? token])
        t3.notOk(a.body.includes('%'), 'the body does not echo the request target')
        const lines = auditsFor(g2, reqId)
        t3.equal(lines.length, 1, 'exactly one audit line')
        t3.match(lines[0], { event: 'auth_failure', reason: 'invalid_path', transport: 'http', path: auditPath, ip: '127.0.0.1', method: 'GET' })
        t3.same(moved(before, await authFailures(g2)), { [seriesKey('invalid_path', 'http')]: 1 })
        t3.equal(up.requests.length, 0, 'never forwarded')
      })
    }
  })
})

// --- the accepted path --------------------------------------------------------------------------------------------------

t.test('a valid token passes and the app gets the verified identity, never the credential', async (t) => {
  const upstream = await upstreamFor(t)
  const g = await startGateway(t, issuer, upstream)
  const token = await issuer.token({
    sub: 'alice',
    realmRoles: ['user', 'admin'],
    clientRoles: { 'resonance-gateway': ['reader'], account: ['view-profile'] },
    username: 'Alice'
  })
  const a = await get(`${g.url}/api/things?x=1`, {
    authorization: `Bearer ${token}`,
    'x-user-sub': 'admin',
    'x-user-roles': 'superuser',
    'x-user-name': 'root',
    'x-user-email': 'root@example.com'
  })
  t.equal(a.status, 200)
  t.equal(upstream.requests.length, 1)
  const seen = upstream.requests[0]
  t.equal(seen?.url, '/api/things?x=1')
  t.equal(seen?.headers['x-user-sub'], 'alice', 'verified sub, the client spoof is gone')
  t.equal(seen?.headers['x-user-roles'], 'user,admin,resonance-gateway:reader',
    'realm roles, plus <client>:<role> for the audiences (JWT_ROLE_CLIENTS default); account roles ignored')
  t.equal(seen?.headers['x-user-name'], 'Alice')
  t.notOk('x-user-email' in (seen?.headers ?? {}), 'every client X-User-* header is stripped')
  t.notOk('authorization' in (seen?.headers ?? {}), 'FORWARD_AUTHORIZATION=false: no Authorization upstream')
  t.same(g.audits(), [], 'no audit line for an allowed request')

  // the same token again (verify cache) still yields the same identity
  const again = await get(`${g.url}/api/things`, { authorization: `Bearer ${token}`, 'x-user-sub': 'admin' })
  t.equal(again.status, 200)
  t.equal(upstream.requests[1]?.headers['x-user-sub'], 'alice')

  // a token without roles or username: no spoofable leftovers
  upstream.reset()
  const plain = await get(`${g.url}/api/things`, { authorization: `Bearer ${await issuer.token({ sub: 'bob' })}`, 'x-user-roles': 'admin' })
  t.equal(plain.status, 200)
  t.equal(upstream.requests[0]?.headers['x-user-sub'], 'bob')
  t.notOk('x-user-roles' in (upstream.requests[0]?.headers ?? {}), 'no roles: no X-User-Roles, not the client one')
  t.notOk('x-user-name' in (upstream.requests[0]?.headers ?? {}))

  await t.test('JWT_ROLE_CLIENTS picks the clients whose roles count', async (tt) => {
    const up = await upstreamFor(tt)
    const g2 = await startGateway(tt, issuer, up, { env: { JWT_ROLE_CLIENTS: 'account' } })
    const res = await get(`${g2.url}/x`, { authorization: `Bearer ${token}` })
    tt.equal(res.status, 200)
    tt.equal(up.requests[0]?.headers['x-user-roles'], 'user,admin,account:view-profile')
  })
})

t.test('clock tolerance on exp', async (t) => {
  const base = await realClaims('clocky')
  const token = await issuer.sign({ ...base, iat: nowSec() - 300, exp: nowSec() - 2 })

  const upstream = await upstreamFor(t)
  const lenient = await startGateway(t, issuer, upstream)
  t.equal((await get(`${lenient.url}/x`, { authorization: `Bearer ${token}` })).status, 200,
    'expired 2 s ago passes with the default JWT_CLOCK_TOLERANCE=5')

  const strict = await startGateway(t, issuer, upstream, { env: { JWT_CLOCK_TOLERANCE: '0' } })
  const reqId = `strict-${randomUUID()}`
  const a = await get(`${strict.url}/x`, { authorization: `Bearer ${token}`, 'x-request-id': reqId })
  t.equal(a.status, 401, 'and fails with JWT_CLOCK_TOLERANCE=0')
  t.match(auditsFor(strict, reqId), [{ reason: 'expired' }])
})

t.test('Keycloak audience realities: aud "account" with azp = our client', async (t) => {
  const upstream = await upstreamFor(t)
  // Keycloak without an audience mapper: aud "account", azp = the client id (here the gateway's audience)
  const token = await issuer.token({ sub: issuer.audience, audience: 'account' })
  t.match(decodeJwt(token), { aud: 'account', azp: issuer.audience })
  const otherClient = await issuer.token({ sub: 'some-other-client', audience: 'account' })

  const strict = await startGateway(t, issuer, upstream)
  const reqId = `acct-${randomUUID()}`
  t.equal((await get(`${strict.url}/x`, { authorization: `Bearer ${token}`, 'x-request-id': reqId })).status, 401,
    'rejected by default')
  t.match(auditsFor(strict, reqId), [{ reason: 'wrong_audience', sub: issuer.audience }])
  t.notOk(strict.logs().some((l) => l.level === 40 && String(l.msg).includes('"account"')), 'no account warning by default')

  const azp = await startGateway(t, issuer, upstream, { env: { JWT_ACCEPT_AZP: 'true' } })
  t.equal((await get(`${azp.url}/x`, { authorization: `Bearer ${token}` })).status, 200, 'accepted with JWT_ACCEPT_AZP=true')
  const reqId2 = `acct2-${randomUUID()}`
  t.equal((await get(`${azp.url}/x`, { authorization: `Bearer ${otherClient}`, 'x-request-id': reqId2 })).status, 401,
    'but not another client\'s account token')
  t.match(auditsFor(azp, reqId2), [{ reason: 'wrong_audience' }])

  const warned = await startGateway(t, issuer, upstream, { env: { JWT_AUDIENCE: `${issuer.audience},account` } })
  const warnings = warned.logs().filter((l) => l.level === 40 && l.component === 'config' && String(l.msg).includes('"account"'))
  t.equal(warnings.length, 1, 'a warning at start when JWT_AUDIENCE contains "account"')
})

// --- role rules ---------------------------------------------------------------------------------------------------------

const ROLE_YAML = `
auth:
  publicPaths: ['/public/**']
  routes:
    - path: /api/resonance/admin/**
      methods: [POST]
      roles: [admin]
`

t.test('role rules from YAML: 403 insufficient_scope, no bypass by case, encoding or dot segments', async (t) => {
  const upstream = await upstreamFor(t)
  const g = await startGateway(t, issuer, upstream, { yaml: ROLE_YAML })
  const user = await issuer.token({ sub: 'bob', realmRoles: ['user'] })
  const clientAdmin = await issuer.token({ sub: 'bob2', clientRoles: { [issuer.audience]: ['admin'] } })
  const admin = await issuer.token({ sub: 'root', realmRoles: ['admin'] })

  async function forbidden (tt: Test, path: string, useRaw: boolean, token = user): Promise<void> {
    upstream.reset()
    const reqId = `forbid-${randomUUID()}`
    const headers = { authorization: `Bearer ${token}`, 'x-request-id': reqId }
    const a = useRaw ? await sendVerbatim(g.url, 'POST', path, headers) : await get(`${g.url}${path}`, headers, 'POST')
    tt.equal(a.status, 403, `POST ${path} is 403`)
    tt.ok(a.headers['www-authenticate']?.startsWith(REALM_PREFIX), 'Bearer challenge')
    tt.match(a.headers['www-authenticate'] ?? '', 'error="insufficient_scope"')
    assertBody(tt, a, 'insufficient_scope', [token])
    const lines = auditsFor(g, reqId)
    tt.equal(lines.length, 1, 'one audit line')
    tt.match(lines[0], { event: 'forbidden', reason: 'missing_role', transport: 'http', method: 'POST', ip: '127.0.0.1' })
    tt.equal(upstream.requests.length, 0, 'the app never saw it')
  }

  await t.test('POST without the role', (tt) => forbidden(tt, '/api/resonance/admin/x', false))
  await t.test('a client role of the same name is not the realm role', (tt) => forbidden(tt, '/api/resonance/admin/x', false, clientAdmin))
  await t.test('POST with the realm role admin', async (tt) => {
    upstream.reset()
    const a = await get(`${g.url}/api/resonance/admin/x`, { authorization: `Bearer ${admin}` }, 'POST')
    tt.equal(a.status, 200)
    tt.equal(upstream.requests[0]?.headers['x-user-sub'], 'root')
    tt.equal(upstream.requests[0]?.method, 'POST')
  })
  await t.test('GET on that path without the role (rule is POST only)', async (tt) => {
    upstream.reset()
    const a = await get(`${g.url}/api/resonance/admin/x`, { authorization: `Bearer ${user}` })
    tt.equal(a.status, 200)
    tt.equal(upstream.requests.length, 1)
  })
  for (const [path, useRaw] of [
    ['/API/Resonance/Admin/x', false],
    ['/api/resonance/x/../admin/x', true],
    ['/api/resonance/./admin/x', true],
    ['/api/resonance/%61dmin/x', false],
    ['/api/resonance//admin/x', true],
    ['/api/resonance/admin', false],
    ['/api/resonance/admin/', false]
  ] as const) {
    await t.test(`bypass attempt ${path}`, (tt) => forbidden(tt, path, useRaw))
  }
  // Targets the gateway will not canonicalise: refused before the token is even looked at.
  for (const path of ['/api/resonance/x/..%2fadmin/x', '/api/resonance/admin%2Fx', '/api/resonance/admin#', '/api/resonance/admin\\x']) {
    await t.test(`bypass attempt ${path}: 400 invalid_path`, async (tt) => {
      upstream.reset()
      const a = await sendVerbatim(g.url, 'POST', path, { authorization: `Bearer ${user}` })
      tt.equal(a.status, 400)
      tt.match(JSON.parse(a.body), { error: 'invalid_request', error_description: 'The request path is invalid' })
      tt.equal(upstream.requests.length, 0, 'the app never saw it')
    })
  }

  await t.test('public path: served without a token, no X-User-* reaches the app', async (tt) => {
    upstream.reset()
    const a = await get(`${g.url}/public/info`, { 'x-user-sub': 'admin', 'x-user-roles': 'admin', 'x-user-name': 'root' })
    tt.equal(a.status, 200)
    const seen = upstream.requests[0]
    tt.equal(seen?.url, '/public/info')
    tt.same(Object.keys(seen?.headers ?? {}).filter((h) => h.startsWith('x-user-')), [], 'no identity headers at all')
    tt.same(g.audits().filter((l) => l.path === '/public/info'), [], 'not audited')
  })

  await t.test('dot segments cannot climb out of a public path', async (tt) => {
    upstream.reset()
    const reqId = `climb-${randomUUID()}`
    const a = await sendVerbatim(g.url, 'GET', '/public/../api/secret', { 'x-request-id': reqId })
    tt.equal(a.status, 401)
    tt.match(auditsFor(g, reqId), [{ reason: 'missing_token' }])
    tt.equal(upstream.requests.length, 0)
  })
})

// --- transport guard ------------------------------------------------------------------------------------------------------

t.test('transport guard: no bearer tokens over plaintext unless a trusted proxy says https', async (t) => {
  const upstream = await upstreamFor(t)
  const token = await issuer.token({ sub: 'tina' })

  const direct = await startGateway(t, issuer, upstream, { env: { ALLOW_INSECURE_HTTP: 'false' } })
  for (const [name, extra] of [['plain http', {}], ['untrusted X-Forwarded-Proto: https', { 'x-forwarded-proto': 'https' }]] as const) {
    await t.test(`${name} with TRUST_PROXY unset: 401`, async (tt) => {
      upstream.reset()
      const reqId = `plain-${randomUUID()}`
      const before = await authFailures(direct)
      const a = await get(`${direct.url}${ROW_PATH}?a=1`, { authorization: `Bearer ${token}`, 'x-request-id': reqId, ...extra })
      await assertDenied(tt, direct, upstream, a, before, {
        status: 401, reason: 'insecure_transport', error: 'invalid_request', transport: 'http', reqId, secrets: [token]
      })
    })
  }

  const proxied = await startGateway(t, issuer, upstream, { env: { ALLOW_INSECURE_HTTP: 'false', TRUST_PROXY: '127.0.0.1' } })
  await t.test('TRUST_PROXY=127.0.0.1 and X-Forwarded-Proto: https: 200', async (tt) => {
    upstream.reset()
    const a = await get(`${proxied.url}/x`, { authorization: `Bearer ${token}`, 'x-forwarded-proto': 'https' })
    tt.equal(a.status, 200)
    tt.equal(upstream.requests[0]?.headers['x-user-sub'], 'tina')
  })
  await t.test('TRUST_PROXY=127.0.0.1 without the header: 401', async (tt) => {
    upstream.reset()
    const reqId = `noxfp-${randomUUID()}`
    const a = await get(`${proxied.url}/x`, { authorization: `Bearer ${token}`, 'x-request-id': reqId })
    tt.equal(a.status, 401)
    tt.match(auditsFor(proxied, reqId), [{ reason: 'insecure_transport', transport: 'http' }])
    tt.equal(upstream.requests.length, 0)
  })
})

// --- WebSocket upgrades ----------------------------------------------------------------------------------------------------

t.test('WebSocket upgrades', async (t) => {
  const upstream = await upstreamFor(t)
  const g = await startGateway(t, issuer, upstream)

  await t.test('no token: 401 before any 101, audited as ws', async (tt) => {
    upstream.reset()
    const reqId = `ws-none-${randomUUID()}`
    const before = await authFailures(g)
    const out = await upgrade(tt, `${g.wsUrl}${ROW_PATH}?room=1`, { headers: { 'x-request-id': reqId } })
    if (out.kind !== 'refused') return tt.fail('the upgrade was accepted')
    tt.notOk(out.upgraded, 'no 101')
    await assertDenied(tt, g, upstream, out, before, { status: 401, reason: 'missing_token', error: undefined, transport: 'ws', reqId, secrets: [] })
  })

  await t.test('invalid token in ?access_token=: 401, audited as ws', async (tt) => {
    upstream.reset()
    const reqId = `ws-exp-${randomUUID()}`
    const expired = await issuer.sign({ ...await realClaims('wsuser'), exp: nowSec() - 60 })
    const before = await authFailures(g)
    const out = await upgrade(tt, `${g.wsUrl}${ROW_PATH}?access_token=${expired}`, { headers: { 'x-request-id': reqId } })
    if (out.kind !== 'refused') return tt.fail('the upgrade was accepted')
    await assertDenied(tt, g, upstream, out, before, { status: 401, reason: 'expired', error: 'invalid_token', transport: 'ws', reqId, secrets: [expired] })
  })

  await t.test('token in ?access_token=: open, the app gets no access_token', async (tt) => {
    upstream.reset()
    const token = await issuer.token({ sub: 'wanda', realmRoles: ['user'] })
    const out = await upgrade(tt, `${g.wsUrl}/ws/chat?room=1&access_token=${token}&lang=en`)
    if (out.kind !== 'open') return tt.fail(`refused with ${out.status}`)
    tt.equal(await exchange(out.ws, 'hello'), 'hello', 'messages flow')
    const rec = upstream.wsConnections[0]
    tt.equal(rec?.url, '/ws/chat?room=1&lang=en', 'access_token removed, the rest kept')
    tt.notOk(rec?.url.includes('access_token'))
    tt.equal(rec?.headers['x-user-sub'], 'wanda')
    tt.notOk('authorization' in (rec?.headers ?? {}))
    out.ws.close()
  })

  await t.test('token in Sec-WebSocket-Protocol: open, the app never sees it', async (tt) => {
    upstream.reset()
    const token = await issuer.token({ sub: 'walt' })
    const out = await upgrade(tt, `${g.wsUrl}/ws/chat`, { protocols: ['bearer', token] })
    if (out.kind !== 'open') return tt.fail(`refused with ${out.status}`)
    tt.equal(out.protocol, 'bearer', 'the client gets the marker back, not its token')
    tt.equal(await exchange(out.ws, 'ping'), 'ping')
    const rec = upstream.wsConnections[0]
    tt.equal(rec?.headers['x-user-sub'], 'walt')
    tt.notOk(String(rec?.headers['sec-websocket-protocol'] ?? '').includes(token), 'no token in the upstream protocol header')
    tt.notOk(rec?.protocol.includes(token))
    out.ws.close()

    upstream.reset()
    const withApp = await upgrade(tt, `${g.wsUrl}/ws/chat`, { protocols: ['bearer', token, 'chat.v1'] })
    if (withApp.kind !== 'open') return tt.fail(`refused with ${withApp.status}`)
    tt.equal(withApp.protocol, 'chat.v1', 'the app protocol is negotiated end to end')
    tt.equal(upstream.wsConnections[0]?.headers['sec-websocket-protocol'], 'chat.v1', 'the app is offered only its protocol')
    withApp.ws.close()
  })

  await t.test('?access_token= on a plain HTTP GET does not authenticate', async (tt) => {
    upstream.reset()
    const token = await issuer.token({ sub: 'hank' })
    const reqId = `qs-http-${randomUUID()}`
    const before = await authFailures(g)
    const a = await get(`${g.url}${ROW_PATH}?access_token=${token}`, { 'x-request-id': reqId })
    await assertDenied(tt, g, upstream, a, before, {
      status: 401, reason: 'missing_token', error: undefined, transport: 'http', reqId, secrets: [token]
    })
  })
})
