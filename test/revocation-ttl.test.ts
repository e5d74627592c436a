// Revocation lifetimes sized from token `exp` values (issue 10, item 5), on real sockets (real issuer, real echo app,
// gateways in-process, real Redis or none):
//   - tokens signed with the issuer's real key whose `exp` is fractional (now + 3600.5 s, now + 7200.1234 s) or absurd
//     (about 9e15 s) are accepted, and afterwards POST /revocations still answers 201 and the revoked token gets 401
//     `revoked`: with Redis (every PX / PXAT an integer, the TTL capped) and without;
//   - an absurd `rev:maxexp` already in Redis (written by an older replica) does not break revocations either;
//   - revocationTtlMs (pure): whole milliseconds, at least the minimum, at most the cap, plus the tolerance.
// One RATE_LIMIT_KEY_PREFIX per gateway on the shared Redis; only those keys are deleted.
import { randomUUID } from 'node:crypto'
import t, { type Test } from 'tap'
import { randomSub } from './helpers/issuer.js'
import { claims } from './helpers/forge.js'
import { getAs, startBackends, startGateway, untilReady, type TestGateway } from './helpers/gateway.js'
import { sharedRedis } from './helpers/redis.js'
import { audits, claims as claimsOf, until } from './helpers/wait.js'
import { MAX_REVOCATION_TTL_MS, revocationTtlMs } from '../src/auth/revocation.js'

const ADMIN_TOKEN = `admin-${randomUUID()}`
const TOLERANCE_MS = 5000 // JWT_CLOCK_TOLERANCE default

const { issuer, upstream } = await startBackends(t)
const { url: redis, client: rc, freshPrefix } = await sharedRedis(t)

async function gateway (tt: Test, env: Record<string, string>): Promise<TestGateway> {
  const g = await startGateway(tt, issuer, upstream, { env: { ADMIN_TOKEN, ...env } })
  await untilReady(g)
  return g
}

async function revoke (g: TestGateway, body: Record<string, string>): Promise<{ status: number, body: string }> {
  const res = await fetch(`${g.adminUrl}/revocations`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify(body)
  })
  return { status: res.status, body: await res.text() }
}

/** A token signed with the issuer's real key, with exactly the `exp` given. */
async function tokenWithExp (exp: number, sub = randomSub('ttl')): Promise<{ token: string, jti: string, sub: string }> {
  const jti = randomUUID()
  const token = await issuer.sign(claims(issuer, { sub, azp: sub, jti, exp }))
  return { token, jti, sub }
}

const nowSec = (): number => Math.floor(Date.now() / 1000)

const EXPS: Array<[string, () => number]> = [
  ['exp = now + 3600.5 (fractional)', () => nowSec() + 3600.5],
  ['exp = now + 7200.1234 (sub-millisecond fraction, beyond REVOCATION_MIN_TTL)', () => nowSec() + 7200.1234],
  ['exp ≈ 9e15 (absurd)', () => 9e15 + 0.25],
  ['exp = now + 400 days', () => nowSec() + 400 * 86400]
]

async function scenario (tt: Test, g: TestGateway, exp: number, pttl: ((jti: string) => Promise<number>) | undefined): Promise<void> {
  const odd = await tokenWithExp(exp)
  tt.equal((await getAs(g, odd.token)).status, 200, 'the token is accepted')

  // Revoking this very token, and a later, ordinary one, both work.
  const r = await revoke(g, { jti: odd.jti })
  tt.equal(r.status, 201, `POST /revocations succeeds (${r.body})`)
  if (r.status === 201) {
    const expiresAt = Date.parse((JSON.parse(r.body) as { expiresAt: string }).expiresAt)
    tt.ok(expiresAt <= Date.now() + MAX_REVOCATION_TTL_MS + TOLERANCE_MS, 'the revocation\'s lifetime is capped')
  }
  const denied = await getAs(g, odd.token)
  tt.equal(denied.status, 401, 'the revoked token is refused')
  tt.match(denied.body, /revoked/, 'as revoked')

  const normal = await tokenWithExp(nowSec() + 300)
  tt.equal((await getAs(g, normal.token)).status, 200)
  tt.equal((await revoke(g, { sub: normal.sub })).status, 201, 'a later revocation by sub succeeds')
  tt.equal((await getAs(g, normal.token)).status, 401, 'the user\'s token is refused')
  tt.equal(audits(g, { reason: 'revoked' }).length, 2, 'both refusals audited as revoked')

  if (pttl !== undefined) {
    for (const key of [`jti:${odd.jti}`, `sub:${normal.sub}`]) {
      const ms = await pttl(key)
      tt.ok(ms > 0 && ms <= MAX_REVOCATION_TTL_MS + TOLERANCE_MS, `Redis holds rev:${key.slice(0, 3)} with a capped TTL (${ms} ms)`)
    }
  }
}

for (const [what, exp] of EXPS) {
  t.test(`with Redis, ${what}: POST /revocations keeps working`, async (tt) => {
    const prefix = freshPrefix()
    const g = await gateway(tt, { REDIS_URL: redis, RATE_LIMIT_KEY_PREFIX: prefix })
    await scenario(tt, g, exp(), async (key) => await rc.pttl(`${prefix}rev:${key}`))
    const maxexp = await rc.get(`${prefix}rev:maxexp`)
    tt.ok(maxexp === null || Number.isInteger(Number(maxexp)), `the shared max exp is an integer (${String(maxexp)})`)
    tt.ok(maxexp === null || Number(maxexp) * 1000 <= Date.now() + MAX_REVOCATION_TTL_MS, 'and never an absurd one')
  })

  t.test(`without Redis, ${what}: POST /revocations keeps working`, async (tt) => {
    const g = await gateway(tt, {})
    await scenario(tt, g, exp(), undefined)
  })
}

t.test('an absurd rev:maxexp already in Redis (an older replica wrote it) is capped, not used as is', async (tt) => {
  const prefix = freshPrefix()
  await rc.set(`${prefix}rev:maxexp`, '9000000000000000.5')
  const g = await gateway(tt, { REDIS_URL: redis, RATE_LIMIT_KEY_PREFIX: prefix })
  const user = await tokenWithExp(nowSec() + 300)
  tt.equal((await getAs(g, user.token)).status, 200)
  const r = await revoke(g, { jti: user.jti })
  tt.equal(r.status, 201, `POST /revocations succeeds (${r.body})`)
  tt.equal((await getAs(g, user.token)).status, 401, 'the revoked token is refused')
  const ms = await rc.pttl(`${prefix}rev:jti:${user.jti}`)
  tt.ok(ms > 0 && ms <= MAX_REVOCATION_TTL_MS + TOLERANCE_MS, `capped TTL in Redis (${ms} ms)`)
  // The token's own exp replaced the absurd shared value.
  await until(async () => await rc.get(`${prefix}rev:maxexp`) === String(claimsOf(user.token).exp), 3000, 'rev:maxexp replaced by a sane exp')
  const left = await rc.pttl(`${prefix}rev:maxexp`)
  tt.ok(left > 0 && left <= 300_000 + 1000, `and it expires with that token (${left} ms)`)
})

t.test('revocationTtlMs: whole milliseconds, at least the minimum, at most the cap, plus the tolerance', async (tt) => {
  const now = 1_800_000_000_000
  const hour = 3_600_000
  const rows: Array<[string, number, number, number, number]> = [
    // what, maxExp (s), minTtlMs, toleranceSec, expected ms
    ['no token seen: the minimum', 0, hour, 5, hour + 5000],
    ['exp sooner than the minimum: the minimum', now / 1000 + 60, hour, 5, hour + 5000],
    ['exp 2 h ahead: until it', now / 1000 + 7200, hour, 5, 2 * hour + 5000],
    ['fractional exp: rounded up', now / 1000 + 7200.0001, hour, 5, 2 * hour + 5000 + 1],
    ['fractional tolerance: rounded up', 0, hour, 0.0004, hour + 1],
    ['exp 400 days ahead: the cap', now / 1000 + 400 * 86400, hour, 5, MAX_REVOCATION_TTL_MS + 5000],
    ['exp 9e15: the cap', 9e15, hour, 5, MAX_REVOCATION_TTL_MS + 5000],
    ['exp Infinity: none', Infinity, hour, 5, hour + 5000],
    ['exp NaN: none', NaN, hour, 5, hour + 5000]
  ]
  for (const [what, maxExp, min, tol, expected] of rows) {
    const ms = revocationTtlMs(maxExp, now, min, tol)
    tt.equal(ms, expected, what)
    tt.ok(Number.isSafeInteger(ms), `${what}: an integer`)
  }
})
