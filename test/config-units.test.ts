// Table tests for the pure functions of src/config: durations and path pattern syntax. One row per rule
// (STYLE habit 15).
import t from 'tap'
import { parseDuration } from '../src/config/duration.js'
import { patternError } from '../src/config/patterns.js'

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
