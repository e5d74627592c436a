// bench/auth-flood.mjs keeps working: a run with 1 s phases (in-process store
// only, one round, fewer tokens) must exit 0, every phase must answer only
// its expected status, a blocked IP's made-up kids and garbage must cause no
// JWKS fetch and no signature check, and its valid tokens must all be served.
// It measures nothing here: the figures of a 1 s run are not worth reading.
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t from 'tap'

interface Row {
  phase: string
  gateway: 'open' | 'blocked'
  codes: Record<string, number>
  jwks: number
  checksPerReq?: number
  problems: string[]
}

const script = path.resolve(import.meta.dirname, '../bench/auth-flood.mjs')

t.test('bench:auth-flood runs its phases and checks what each must answer', { timeout: 120_000 }, async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'bench-auth-flood-'))
  const json = path.join(dir, 'result.json')
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    BENCH_WARMUP: '0.3',
    BENCH_DURATION: '1',
    BENCH_PRIME: '0.5',
    BENCH_ROUNDS: '1',
    BENCH_TOKENS: '200',
    BENCH_FLOOD_KIDS: '640',
    BENCH_FLOOD_STORES: 'memory',
    BENCH_FLOOD_OUT: path.join(dir, 'auth-flood.md'),
    BENCH_FLOOD_JSON: json
  }
  const child = spawn(process.execPath, [script], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout.on('data', (d: Buffer) => { out += String(d) })
  child.stderr.on('data', (d: Buffer) => { out += String(d) })
  const code = await new Promise<number | null>((resolve) => child.on('exit', resolve))
  t.equal(code, 0, `exit code 0\n${out.slice(-3000)}`)

  const result = JSON.parse(readFileSync(json, 'utf8')) as { failures: string[], passes: Array<{ store: string, rows: Row[] }> }
  t.same(result.failures, [], 'no phase failed its checks')
  const rows = result.passes[0]?.rows ?? []
  t.same(rows.map((r) => r.phase), ['1', '2', '3', '3r', '5u', '4', '4r', '5', '6', '6j', '7'], 'every phase ran')
  const by = (id: string): Row => rows.find((r) => r.phase === id) as Row
  const only = (id: string, status: string): void => {
    const r = by(id)
    t.same(Object.keys(r.codes), [status], `phase ${id}: only ${status} (${JSON.stringify(r.codes)})`)
    t.ok((r.codes[status] ?? 0) > 0, `phase ${id}: answered`)
  }
  only('1', '200')
  only('2', '401')
  only('3', '401')
  only('4', '429')
  only('5', '429')
  only('6', '429')
  only('6j', '429')
  only('7', '200')
  for (const id of ['5', '6', '6j']) {
    t.equal(by(id).jwks, 0, `phase ${id}: no JWKS fetch from a blocked IP`)
    t.equal(by(id).checksPerReq, 0, `phase ${id}: no signature check`)
  }
  // The counter is read around the measurement while up to 64 requests are in flight: checks of requests answered
  // just outside the window can count in it (the script's own check allows the same 2 x connections).
  const four = by('4')
  const answered = Object.values(four.codes).reduce((a, b) => a + b, 0)
  t.ok((four.checksPerReq ?? Infinity) <= 1 + 128 / answered, `phase 4: at most one signature check per bad token (${four.checksPerReq} over ${answered} requests)`)
})
