// The verified-token cache (src/auth/verified.ts, used by src/auth/plugin.ts), end to end through real sockets: a
// real oidc-provider issuer, the gateway in-process (startGateway), the recording upstream. A token is cached by
// being accepted once; then:
//   (a) expiry: a cached token is refused (401 expired) once exp + JWT_CLOCK_TOLERANCE has passed, and the app sees
//       nothing; with a tolerance the cached token lives exactly that much longer;
//   (b) key removal: once the issuer no longer publishes the token's key and the gateway's key set is refreshed
//       (by an unknown kid, or in the background after JWKS_CACHE_TTL), the SAME cached token gets 401 unknown_kid;
//   (c) reload: role rules changed by a reload apply to a cached token (403); JWT_AUDIENCE is restart-only (a reload
//       reports it and keeps the audience in force); with a JWKS relay that re-publishes the token's kid with
//       different key material, a cached token is fully re-verified (bad_signature) at once, and after a reload;
//   (d) JWT_CACHE_SIZE=0 accepts valid tokens, refuses tampered ones and keeps no verdict (the same relay trick gives
//       bad_signature at once); with the cache on, a tampered copy of a cached token is refused bad_signature;
//   (e) revocation is checked after a cache hit.
import http from 'node:http'
import { randomUUID } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import type { AddressInfo } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { decodeProtectedHeader, type JWK } from 'jose'
import { randomSub } from './helpers/issuer.js'
import { claims as forgedClaims, foreignRsaKey, forgeToken } from './helpers/forge.js'
import { startBackends, startGateway, writeYaml, type TestGateway } from './helpers/gateway.js'
import { audits, claims, until } from './helpers/wait.js'

const { issuer, upstream } = await startBackends(t)

// --- helpers -----------------------------------------------------------------------------------------------------------

interface Answer { status: number, body: { error?: string }, wwwAuthenticate: string | null, reqId: string }

async function call (g: TestGateway, token: string, path = '/api/data', method = 'GET'): Promise<Answer> {
  const reqId = `vc-${randomUUID()}`
  const res = await fetch(`${g.url}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'x-request-id': reqId },
    signal: AbortSignal.timeout(10_000)
  })
  const text = await res.text()
  let body: { error?: string } = {}
  try { body = JSON.parse(text) as { error?: string } } catch {}
  return { status: res.status, body, wwwAuthenticate: res.headers.get('www-authenticate'), reqId }
}

/** The request was refused with 401 + `reason`, one audit line says so, and the app saw nothing since `reset()`. */
function assertRefused (tt: Test, g: TestGateway, a: Answer, reason: string, what: string): void {
  tt.equal(a.status, 401, `${what}: 401`)
  tt.equal(a.body.error, 'invalid_token', `${what}: invalid_token body`)
  tt.match(a.wwwAuthenticate ?? '', 'error="invalid_token"', `${what}: RFC 6750 challenge`)
  tt.match(audits(g, { reqId: a.reqId }), [{ event: 'auth_failure', reason, status: 401 }], `${what}: audited as ${reason}`)
  tt.equal(upstream.requests.length, 0, `${what}: the app saw no request`)
}

/** One character in the middle of the signature changed (never the last one: its low bits may be padding). */
function tamperSignature (token: string): string {
  const [h, p, s = ''] = token.split('.')
  const i = Math.floor(s.length / 2)
  const c = s[i] === 'A' ? 'B' : 'A'
  return `${h}.${p}.${s.slice(0, i)}${c}${s.slice(i + 1)}`
}

const kidOf = (token: string): string | undefined => decodeProtectedHeader(token).kid

async function publishedKids (): Promise<string[]> {
  const res = await fetch(issuer.jwksUrl)
  const body = await res.json() as { keys: Array<{ kid?: string }> }
  return body.keys.map((k) => k.kid ?? '')
}

/**
 * A JWKS endpoint relaying the real issuer's JWKS, which can re-publish one kid with a different (foreign) public key:
 * the gateway then holds, under the token's kid, material that does NOT verify the token. A full verification refuses
 * the token (bad_signature); only a cached verdict can still admit it.
 */
interface JwksRelay { url: string, fetches: number, swap (kid: string, publicJwk: JWK): void, close (): Promise<void> }

async function startJwksRelay (tt: Test): Promise<JwksRelay> {
  let swapped: { kid: string, jwk: JWK } | undefined
  const relay = {
    url: '',
    fetches: 0,
    swap (kid: string, publicJwk: JWK): void { swapped = { kid, jwk: publicJwk } },
    close: async (): Promise<void> => {}
  }
  const server = http.createServer((_req, res) => {
    relay.fetches++
    fetch(issuer.jwksUrl).then(async (r) => {
      const body = await r.json() as { keys: JWK[] }
      const keys = body.keys.map((k) => swapped !== undefined && k.kid === swapped.kid
        ? { kty: swapped.jwk.kty, n: swapped.jwk.n, e: swapped.jwk.e, kid: k.kid, alg: k.alg, use: k.use }
        : k)
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ keys }))
    }).catch(() => { res.writeHead(502).end() })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  relay.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/certs`
  relay.close = () => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()) })
  tt.teardown(() => relay.close())
  return relay
}

/** A token with a kid nobody publishes: with JWKS_MIN_REFRESH_INTERVAL=0 it makes the gateway refetch its key set. */
async function unknownKidToken (): Promise<string> {
  const foreign = await foreignRsaKey()
  return forgeToken({ alg: 'RS256', key: foreign.privateKey, header: { kid: `unknown-${randomUUID()}` }, payload: forgedClaims(issuer) })
}

/**
 * Re-publishes `kid` with foreign key material through `relay` and makes `g` load it. Afterwards a fresh token
 * signed by the real key of `kid` (never seen, so not cached) is refused bad_signature: the gateway's key for that
 * kid no longer verifies it.
 */
async function swapKeyMaterial (tt: Test, g: TestGateway, relay: JwksRelay, kid: string, sub: string): Promise<void> {
  const before = relay.fetches
  relay.swap(kid, (await foreignRsaKey()).publicJwk)
  upstream.reset()
  assertRefused(tt, g, await call(g, await unknownKidToken()), 'unknown_kid', 'unknown kid (refresh trigger)')
  tt.ok(relay.fetches > before, 'the gateway refetched the key set')
  const fresh = await issuer.token({ sub })
  tt.equal(kidOf(fresh), kid, 'a fresh token signed by the same real key')
  upstream.reset()
  assertRefused(tt, g, await call(g, fresh), 'bad_signature', 'a fresh (uncached) token after the swap')
}

// time-based by nature: expiry is a moment on the clock
async function sleepUntil (epochMs: number): Promise<void> {
  const wait = epochMs - Date.now()
  if (wait > 0) await sleep(wait)
}

// --- (a) expiry --------------------------------------------------------------------------------------------------------

t.test('(a) a cached token is refused 401 expired once exp + JWT_CLOCK_TOLERANCE has passed', async (t) => {
  const strict = await startGateway(t, issuer, upstream, { env: { JWT_CLOCK_TOLERANCE: '0' } })
  const lenient = await startGateway(t, issuer, upstream, { env: { JWT_CLOCK_TOLERANCE: '2' } })
  const token = await issuer.token({ sub: randomSub('exp'), ttlSeconds: 2 })
  const expMs = claims(token).exp * 1000

  for (const g of [strict, lenient]) {
    t.equal((await call(g, token)).status, 200, 'accepted (now cached)')
    t.equal((await call(g, token)).status, 200, 'accepted again (a cache hit)')
  }
  t.ok(Date.now() < expMs, 'all of that before exp')

  await sleepUntil(expMs + 150)
  upstream.reset()
  assertRefused(t, strict, await call(strict, token), 'expired', 'tolerance 0, just after exp')
  assertRefused(t, strict, await call(strict, token), 'expired', 'tolerance 0, again')
  t.equal((await call(lenient, token)).status, 200, 'tolerance 2 s: still accepted just after exp')

  await sleepUntil(expMs + 2_000 + 150)
  upstream.reset()
  assertRefused(t, lenient, await call(lenient, token), 'expired', 'tolerance 2 s, after exp + 2 s')
})

// --- (b) key removal ---------------------------------------------------------------------------------------------------

t.test('(b) a cached token stops once its key is gone from the JWKS and the key set is refreshed', async (t) => {
  // every subtest rotates the shared issuer; each leaves it with a single current key
  await t.test('refresh triggered by an unknown kid', async (tt) => {
    const g = await startGateway(tt, issuer, upstream, { env: { JWKS_URL: issuer.jwksUrl, JWKS_MIN_REFRESH_INTERVAL: '0' } })
    const tokenA = await issuer.token({ sub: randomSub('keyA') })
    const kidA = kidOf(tokenA)
    tt.equal(kidA, issuer.currentKid())
    tt.equal((await call(g, tokenA)).status, 200, 'accepted (now cached)')
    tt.equal((await call(g, tokenA)).status, 200, 'accepted again')

    await issuer.rotate()
    await issuer.dropOldKeys()
    const kidB = issuer.currentKid()
    tt.not(kidB, kidA)
    tt.same(await publishedKids(), [kidB], 'the issuer publishes only the new key B: A is gone')

    tt.equal((await call(g, tokenA)).status, 200, 'before any refresh the gateway still knows A (bounded by the next refresh)')

    const jwksBefore = issuer.stats.jwks
    const tokenB = await issuer.token({ sub: randomSub('keyB') })
    tt.equal(kidOf(tokenB), kidB)
    tt.equal((await call(g, tokenB)).status, 200, 'a token of key B: unknown kid -> refetch -> accepted')
    tt.ok(issuer.stats.jwks > jwksBefore, 'the gateway refetched the JWKS')

    upstream.reset()
    assertRefused(tt, g, await call(g, tokenA), 'unknown_kid', 'the SAME cached token of key A')
    assertRefused(tt, g, await call(g, tokenA), 'unknown_kid', 'and again')
    tt.equal((await call(g, tokenB)).status, 200, 'key B tokens keep working')
  })

  await t.test('refresh in the background after JWKS_CACHE_TTL', async (tt) => {
    const g = await startGateway(tt, issuer, upstream, { env: { JWKS_URL: issuer.jwksUrl, JWKS_CACHE_TTL: '1s' } })
    const tokenA = await issuer.token({ sub: randomSub('keyA') })
    const kidA = kidOf(tokenA)
    tt.equal((await call(g, tokenA)).status, 200, 'accepted (now cached)')

    await issuer.rotate()
    await issuer.dropOldKeys()
    tt.notOk((await publishedKids()).includes(kidA ?? ''), 'key A no longer published')

    // nothing but time: the key set ages past JWKS_CACHE_TTL and is refetched in the background
    let last: Answer | undefined
    await until(async () => {
      last = await call(g, tokenA)
      return last.status === 401
    }, 8_000, 'the cached token of the dropped key is refused')
    tt.match(audits(g, { reqId: last?.reqId }), [{ event: 'auth_failure', reason: 'unknown_kid', status: 401 }], 'refused as unknown_kid')
    upstream.reset()
    assertRefused(tt, g, await call(g, tokenA), 'unknown_kid', 'the same cached token, again')
    tt.equal((await call(g, await issuer.token({ sub: randomSub('keyB') }))).status, 200, 'the new key works')
  })
})

// --- (c) reload --------------------------------------------------------------------------------------------------------

const ADMIN_RULE = 'auth:\n  routes:\n    - path: /api/admin/**\n      roles: [admin]\n'

t.test('(c) a cached verdict never outlives the configuration in force', async (t) => {
  await t.test('role rules changed by a reload apply to a cached token (403)', async (tt) => {
    const file = writeYaml('auth:\n  publicPaths: []\n')
    const g = await startGateway(tt, issuer, upstream, { env: { CONFIG_FILE: file } })
    const user = await issuer.token({ sub: randomSub('user'), realmRoles: ['user'] })
    const admin = await issuer.token({ sub: randomSub('admin'), realmRoles: ['admin'] })
    tt.equal((await call(g, user, '/api/admin/x', 'POST')).status, 200, 'no rule yet: accepted (now cached)')
    tt.equal((await call(g, user, '/api/admin/x', 'POST')).status, 200, 'accepted again')

    writeFileSync(file, ADMIN_RULE)
    tt.same(g.gw.reload(), { ok: true, restartNeeded: [] }, 'reloaded')
    upstream.reset()
    const a = await call(g, user, '/api/admin/x', 'POST')
    tt.equal(a.status, 403, 'the same token is now forbidden')
    tt.equal(a.body.error, 'insufficient_scope')
    tt.match(audits(g, { reqId: a.reqId }), [{ event: 'forbidden', reason: 'missing_role', status: 403 }])
    tt.equal(upstream.requests.length, 0, 'the app saw nothing')
    tt.equal((await call(g, admin, '/api/admin/x', 'POST')).status, 200, 'a token with the role passes')

    writeFileSync(file, 'auth:\n  publicPaths: []\n')
    tt.same(g.gw.reload(), { ok: true, restartNeeded: [] })
    tt.equal((await call(g, user, '/api/admin/x', 'POST')).status, 200, 'rule removed: accepted again')
  })

  await t.test('JWT_AUDIENCE is restart-only: a reload reports it and keeps the audience in force', async (tt) => {
    const file = writeYaml(`auth:\n  audience: [${issuer.audience}]\n`)
    // env wins over the file: unset JWT_AUDIENCE so the file decides
    const g = await startGateway(tt, issuer, upstream, { env: { CONFIG_FILE: file, JWT_AUDIENCE: '' } })
    const token = await issuer.token({ sub: randomSub('aud') })
    tt.equal((await call(g, token)).status, 200, 'accepted (now cached)')

    writeFileSync(file, 'auth:\n  audience: [some-other-audience]\n')
    const r = g.gw.reload()
    tt.equal(r.ok, true)
    // (the role clients default to the audiences, so they are reported too)
    tt.ok(r.restartNeeded.includes('auth.audience'), `the audience change is reported as needing a restart (${r.restartNeeded.join(', ')})`)
    tt.same(g.gw.live.current.auth.audiences, [issuer.audience], 'and the old audience stays in force')
    tt.equal((await call(g, token)).status, 200, 'so the token is still accepted (no wrong_audience without a restart)')
  })

  await t.test('a kid re-published with other key material: the cached verdict is dropped at once, and a reload keeps it dropped', async (tt) => {
    const relay = await startJwksRelay(tt)
    const file = writeYaml('auth:\n  publicPaths: []\n')
    const g = await startGateway(tt, issuer, upstream, { env: { CONFIG_FILE: file, JWKS_URL: relay.url, JWKS_MIN_REFRESH_INTERVAL: '0' } })
    const sub = randomSub('reload')
    const token = await issuer.token({ sub })
    const kid = kidOf(token) ?? ''
    tt.equal((await call(g, token)).status, 200, 'accepted (now cached)')

    await swapKeyMaterial(tt, g, relay, kid, sub)
    upstream.reset()
    assertRefused(tt, g, await call(g, token), 'bad_signature',
      'the cached token after its kid changed key: a hit needs the very key that verified it, so it is fully re-verified')

    writeFileSync(file, 'auth:\n  publicPaths: []\n# touched\n')
    tt.same(g.gw.reload(), { ok: true, restartNeeded: [] }, 'reloaded (no policy change at all)')
    upstream.reset()
    assertRefused(tt, g, await call(g, token), 'bad_signature', 'the same token after the reload (the reload empties the cache as a safety net)')
  })
})

// --- (d) JWT_CACHE_SIZE=0 and tampering ------------------------------------------------------------------------------------

t.test('(d) JWT_CACHE_SIZE=0 and tampered copies', async (t) => {
  await t.test('JWT_CACHE_SIZE=0: valid accepted, tampered refused, no verdict kept', async (tt) => {
    const relay = await startJwksRelay(tt)
    const g = await startGateway(tt, issuer, upstream, { env: { JWT_CACHE_SIZE: '0', JWKS_URL: relay.url, JWKS_MIN_REFRESH_INTERVAL: '0' } })
    tt.equal(g.gw.live.current.auth.verifyCacheSize, 0)
    const sub = randomSub('nocache')
    const token = await issuer.token({ sub })
    for (let i = 0; i < 3; i++) tt.equal((await call(g, token)).status, 200, `valid token accepted (${i + 1})`)
    upstream.reset()
    assertRefused(tt, g, await call(g, tamperSignature(token)), 'bad_signature', 'tampered signature')
    tt.equal((await call(g, token)).status, 200, 'the genuine token still accepted')

    // with no cache, the very token accepted a moment ago is refused as soon as its key no longer verifies it
    await swapKeyMaterial(tt, g, relay, kidOf(token) ?? '', sub)
    upstream.reset()
    assertRefused(tt, g, await call(g, token), 'bad_signature', 'the previously accepted token: no cached verdict')
  })

  await t.test('cache on: a tampered copy of a cached token is refused bad_signature', async (tt) => {
    const g = await startGateway(tt, issuer, upstream)
    const token = await issuer.token({ sub: randomSub('tamper') })
    const tampered = tamperSignature(token)
    tt.not(tampered, token)
    tt.equal((await call(g, token)).status, 200, 'genuine accepted (now cached)')
    upstream.reset()
    assertRefused(tt, g, await call(g, tampered), 'bad_signature', 'tampered copy right after the genuine one')
    assertRefused(tt, g, await call(g, tampered), 'bad_signature', 'tampered copy again (failures are never cached)')
    const [h, p] = token.split('.')
    const other = await issuer.token({ sub: randomSub('other') })
    const spliced = `${h}.${p}.${other.split('.')[2] ?? ''}`
    assertRefused(tt, g, await call(g, spliced), 'bad_signature', 'the payload with another token\'s valid signature')
    tt.equal((await call(g, token)).status, 200, 'the genuine token still accepted')
  })
})

// --- (e) revocation after a hit ---------------------------------------------------------------------------------------------

t.test('(e) revocation is checked after a cache hit', async (t) => {
  const adminToken = `admin-${randomUUID()}`
  const g = await startGateway(t, issuer, upstream, { env: { ADMIN_TOKEN: adminToken } })
  const token = await issuer.token({ sub: randomSub('rev') })
  t.equal((await call(g, token)).status, 200, 'accepted (now cached)')
  t.equal((await call(g, token)).status, 200, 'accepted again')
  const res = await fetch(`${g.adminUrl}/revocations`, {
    method: 'POST',
    headers: { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ jti: claims(token).jti })
  })
  t.equal(res.status, 201, 'jti revoked')
  upstream.reset()
  assertRefused(t, g, await call(g, token), 'revoked', 'the cached token after its revocation')
})
