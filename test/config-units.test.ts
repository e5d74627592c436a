// Table tests for the pure functions of src/config: durations and path pattern syntax. One row per rule
// (STYLE habit 15). And the Config's scalar part as derived from the settings table: every leaf at its field path.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { parseDuration } from '../src/config/duration.js'
import { loadConfig, STRUCTURED } from '../src/config/load.js'
import { seconds } from '../src/config/parsers.js'
import { patternError } from '../src/config/patterns.js'
import { LEAVES, type Leaf } from '../src/config/settings.js'

t.test('parseDuration', async (t) => {
  const rows: Array<[unknown, number | undefined]> = [
    // bare numbers are milliseconds
    [0, 0],
    [1500, 1500],
    [60_000, 60_000],
    [1.4, 1],
    // strings, with or without a unit
    ['60000', 60_000],
    ['250ms', 250],
    ['60s', 60_000],
    ['1m', 60_000],
    ['1.5h', 5_400_000],
    ['2d', 172_800_000],
    [' 60s ', 60_000],
    ['60 s', 60_000],
    ['60S', 60_000],
    ['0', 0],
    // unreadable
    ['', undefined],
    ['   ', undefined],
    ['-1', undefined],
    ['-1s', undefined],
    ['1y', undefined],
    ['abc', undefined],
    ['1e3', undefined],
    ['1.5.5s', undefined],
    ['s', undefined],
    ['100000000000000000000', undefined],
    [NaN, undefined],
    [Infinity, undefined],
    [-Infinity, undefined],
    [-5, undefined],
    [null, undefined],
    [undefined, undefined],
    [true, undefined],
    [['60s'], undefined],
    [{}, undefined]
  ]
  for (const [input, expected] of rows) {
    t.equal(parseDuration(input), expected, `${typeof input === 'string' ? JSON.stringify(input) : String(input)} -> ${String(expected)}`)
  }
})

t.test('patternError', async (t) => {
  const rows: Array<[unknown, RegExp | undefined]> = [
    ['/', undefined],
    ['/healthz', undefined],
    ['/api/v1/users', undefined],
    ['/users/*', undefined],
    ['/users/*/profile', undefined],
    ['/api/**', undefined],
    ['/**', undefined],
    ['/a/*/b/**', undefined],
    ['/trailing/', undefined],
    ['', /starting with "\/"/],
    ['api/**', /starting with "\/"/],
    ['*', /starting with "\/"/],
    [5, /starting with "\/"/],
    [null, /starting with "\/"/],
    [undefined, /starting with "\/"/],
    [['/a'], /starting with "\/"/],
    ['/api*', /"\*" only as a whole segment/],
    ['/a/b*c', /"\*" only as a whole segment/],
    ['/a/***', /"\*" only as a whole segment/],
    ['/a/**/b', /"\*\*" only as the last segment/],
    ['/**/x', /"\*\*" only as the last segment/],
    ['/a/**/', /"\*\*" only as the last segment/]
  ]
  for (const [pattern, expected] of rows) {
    const err = patternError(pattern)
    if (expected === undefined) t.equal(err, undefined, `${JSON.stringify(pattern)} is valid`)
    else t.match(err, expected, `${JSON.stringify(pattern) ?? 'undefined'} -> ${String(expected)}`)
  }
})

t.test('the Config holds every leaf at its field path, with its default, and no other scalar', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'gw-config-units-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const file = join(dir, 'empty.yaml')
  writeFileSync(file, '')
  const required = { JWT_ISSUER: 'https://id.example.com/realms/demo', JWT_AUDIENCE: 'web,api' }
  const config = loadConfig({ env: required, file })
  const at = (path: string): unknown => path.split('.').reduce<unknown>((node, k) => (node as Record<string, unknown>)[k], config)

  const fieldPaths: string[] = []
  for (const [path, leaf] of Object.entries(LEAVES) as Array<[string, Leaf<unknown>]>) {
    if (leaf.field === false) {
      t.equal(config.leaves[path as keyof typeof LEAVES], leaf.default, `${path}: in config.leaves only (load.ts builds its part)`)
      continue
    }
    // The YAML path with the last name replaced by `field`; the object it sits in is the YAML key's.
    const fieldPath = leaf.field === undefined ? path : path.replace(/[^.]+$/, leaf.field)
    fieldPaths.push(fieldPath)
    const expected = leaf.required === true
      ? { 'auth.issuer': required.JWT_ISSUER, 'auth.audience': ['web', 'api'] }[path]
      : path === 'auth.roleClients' ? ['web', 'api'] : leaf.default // empty JWT_ROLE_CLIENTS: the audiences
    t.strictSame(at(fieldPath), expected, `${path} -> config.${fieldPath}`)
    if ((leaf.parse as { unit?: string }).unit === 'ms') t.match(fieldPath, /Ms$/, `${path}: a duration's field names its unit`)
    if (leaf.parse === seconds) t.match(fieldPath, /Sec$/, `${path}: seconds' field names its unit`)
  }

  // Every plain value under the Config's sections, but for the structured and derived parts, is a leaf's.
  const scalars: string[] = []
  const derived = new Set([...STRUCTURED, 'auth.isPublic', 'server.tls'])
  const walk = (node: Record<string, unknown>, prefix: string): void => {
    for (const [k, v] of Object.entries(node)) {
      const path = prefix === '' ? k : `${prefix}.${k}`
      if (derived.has(path)) continue
      if (typeof v === 'object' && v !== null && !Array.isArray(v)) walk(v as Record<string, unknown>, path)
      else scalars.push(path)
    }
  }
  const { source: _source, leaves: _leaves, ...sections } = config
  walk(sections, '')
  t.strictSame(scalars.sort(), fieldPaths.sort(), 'the scalar Config fields are exactly the leaves\' field paths')

  // The renamed fields, typed: these lines compile only while the table declares these names and types.
  const renamed: Array<[number | string[], unknown]> = [
    [config.upstream.timeoutMs, LEAVES['upstream.timeout'].default],
    [config.auth.clockToleranceSec, LEAVES['auth.clockTolerance'].default],
    [config.auth.audiences, ['web', 'api']],
    [config.ws.messageLimit.windowMs, LEAVES['ws.messageLimit.window'].default],
    [config.rateLimit.authFailures.windowMs, LEAVES['rateLimit.authFailures.window'].default]
  ]
  for (const [value, expected] of renamed) t.strictSame(value, expected)
})
