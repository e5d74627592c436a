// The command line: check-config (exit 0/1, secrets masked) and revoke (through a running gateway's admin API).
import { execFile } from 'node:child_process'
import { existsSync } from 'node:fs'
import { promisify } from 'node:util'
import t from 'tap'
import { startIssuer } from './helpers/issuer.js'
import { startUpstream } from './helpers/upstream.js'
import { startGateway, writeYaml } from './helpers/gateway.js'

const run = promisify(execFile)
const CLI = 'dist/cli.js'
const ADMIN_TOKEN = 'cli-test-admin-token-0123456789'

async function cli (args: string[], env: Record<string, string>): Promise<{ code: number, stdout: string, stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [CLI, ...args], { env: { PATH: process.env.PATH ?? '', ...env }, timeout: 20_000 })
    return { code: 0, stdout, stderr }
  } catch (err) {
    const e = err as { code: number, stdout: string, stderr: string }
    return { code: e.code, stdout: e.stdout, stderr: e.stderr }
  }
}

t.before(async () => {
  if (!existsSync(CLI)) await run('npm', ['run', 'build'])
})

t.test('check-config', async (t) => {
  const good = {
    CONFIG_FILE: writeYaml('rateLimit:\n  roles:\n    - role: premium\n      max: 1000\n'),
    JWT_ISSUER: 'https://kc.example/realms/x',
    JWT_AUDIENCE: 'resonance-gateway',
    REDIS_URL: 'redis://:hunter2-very-secret@redis:6379/0',
    ADMIN_TOKEN
  }
  const ok = await cli(['check-config'], good)
  t.equal(ok.code, 0)
  t.match(ok.stdout, /configuration OK/)
  t.match(ok.stdout, /auth\.issuer\s+JWT_ISSUER\s+https:\/\/kc\.example\/realms\/x\s+\(env\)/)
  t.match(ok.stdout, /rateLimit\.max\s+RATE_LIMIT_MAX\s+100/)
  t.match(ok.stdout, /premium=1000\/60000ms/)
  t.notMatch(ok.stdout, /hunter2/, 'the Redis password is masked')
  t.notMatch(ok.stdout, new RegExp(ADMIN_TOKEN), 'the admin token is masked')
  t.match(ok.stdout, /redis:\/\/:\*+@redis:6379\/0/)

  const bad = await cli(['check-config'], { ...good, PORT: 'abc', JWT_ISSUER: '' })
  t.equal(bad.code, 1)
  t.match(bad.stderr, /server\.port \(PORT\)/)
  t.match(bad.stderr, /auth\.issuer \(JWT_ISSUER\): is required/)

  const file = await cli(['check-config', '--file', writeYaml('server:\n  prot: 1\n')], { JWT_ISSUER: 'https://kc/realms/x', JWT_AUDIENCE: 'a' })
  t.equal(file.code, 1)
  t.match(file.stderr, /server\.prot: unknown key/)

  const usage = await cli(['frobnicate'], {})
  t.equal(usage.code, 2)
  t.match(usage.stderr, /usage:/)
})

t.test('--help and -h: usage on stdout, exit 0, for the program and for every command', async (t) => {
  for (const args of [['--help'], ['-h'], ['help']]) {
    const r = await cli(args, {})
    t.equal(r.code, 0, `${args.join(' ')} exits 0`)
    t.match(r.stdout, /usage:/)
    t.match(r.stdout, /check-config/)
    t.match(r.stdout, /revoke/)
    t.equal(r.stderr, '')
  }
  const expected: Record<string, RegExp> = {
    'check-config': /usage: resonance-gateway check-config \[--file <gateway\.yaml>\]/,
    revoke: /usage: resonance-gateway revoke \(--sub <sub> \| --jti <jti> \| --sid <sid>\)/,
    serve: /usage: resonance-gateway \[serve\]/
  }
  for (const [command, usage] of Object.entries(expected)) {
    for (const help of ['--help', '-h']) {
      // No JWT_ISSUER, no ADMIN_TOKEN: help needs no configuration, and `serve --help` must not start a gateway.
      const r = await cli([command, help], {})
      t.equal(r.code, 0, `${command} ${help} exits 0 (${r.stderr})`)
      t.match(r.stdout, usage, `${command} ${help} prints the command's usage`)
      t.equal(r.stderr, '', `${command} ${help}: nothing on stderr`)
    }
  }
  // Help wins over other options and over their missing values.
  const r = await cli(['revoke', '--sub', 'x', '--help'], {})
  t.equal(r.code, 0)
  t.match(r.stdout, expected.revoke)
  // An unknown option is still a usage error (exit 2, usage on stderr), for serve too.
  for (const args of [['check-config', '--nope', 'x'], ['serve', '--nope']]) {
    const bad = await cli(args, {})
    t.equal(bad.code, 2, `${args.join(' ')} exits 2`)
    t.match(bad.stderr, /unknown option --nope/)
    t.match(bad.stderr, /usage:/)
  }
})

t.test('revoke through the admin API', async (t) => {
  const issuer = await startIssuer()
  t.teardown(() => issuer.close())
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  const g = await startGateway(t, issuer, upstream, { env: { ADMIN_TOKEN } })
  const token = await issuer.token({ sub: 'cli-victim' })
  const auth = { authorization: `Bearer ${token}` }
  t.equal((await fetch(`${g.url}/x`, { headers: auth })).status, 200)

  const noToken = await cli(['revoke', '--sub', 'cli-victim', '--admin-url', g.adminUrl], {})
  t.equal(noToken.code, 1)
  t.match(noToken.stderr, /ADMIN_TOKEN/)
  const wrong = await cli(['revoke', '--sub', 'cli-victim', '--admin-url', g.adminUrl], { ADMIN_TOKEN: 'wrong-token-wrong-token' })
  t.equal(wrong.code, 1)
  t.match(wrong.stderr, /HTTP 401/)

  const res = await cli(['revoke', '--sub', 'cli-victim', '--admin-url', g.adminUrl], { ADMIN_TOKEN })
  t.equal(res.code, 0, res.stderr)
  t.match(JSON.parse(res.stdout), { kind: 'sub', value: 'cli-victim' })
  const after = await fetch(`${g.url}/x`, { headers: auth })
  t.equal(after.status, 401)
  t.match(after.headers.get('www-authenticate'), /error="invalid_token"/)
  t.ok(g.audits().some((a) => a.reason === 'revoked' && a.sub === 'cli-victim'))

  // --sid: one login session of a user ends, the user's other session keeps working.
  const ended = await issuer.token({ sub: 'cli-sessions', sid: 'cli-session-1' })
  const other = await issuer.token({ sub: 'cli-sessions', sid: 'cli-session-2' })
  const bySid = await cli(['revoke', '--sid', 'cli-session-1', '--admin-url', g.adminUrl], { ADMIN_TOKEN })
  t.equal(bySid.code, 0, bySid.stderr)
  t.match(JSON.parse(bySid.stdout), { kind: 'sid', value: 'cli-session-1' })
  t.equal((await fetch(`${g.url}/x`, { headers: { authorization: `Bearer ${ended}` } })).status, 401, 'the session\'s token is refused')
  t.equal((await fetch(`${g.url}/x`, { headers: { authorization: `Bearer ${other}` } })).status, 200, 'the other session\'s token still works')
  const two = await cli(['revoke', '--sid', 'a', '--sub', 'b', '--admin-url', g.adminUrl], { ADMIN_TOKEN })
  t.equal(two.code, 2, 'two kinds at once: a usage error')
  t.match(two.stderr, /exactly one of --sub, --jti or --sid/)
})
