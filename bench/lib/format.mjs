// Number formats and small text helpers shared by the console lines and the report.

export function median (xs) {
  const v = xs.filter((x) => x !== undefined && Number.isFinite(x)).sort((a, b) => a - b)
  if (v.length === 0) return undefined
  const m = v.length >> 1
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2
}

export const fmt = {
  int: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : Math.round(x).toLocaleString('en-US')),
  ms: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(2)),
  us: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(0)),
  ratio: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : `${x.toFixed(2)}×`),
  pct: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : `${x.toFixed(0)}%`),
  mib: (kib) => (kib === undefined || !Number.isFinite(kib) ? 'n/a' : (kib / 1024).toFixed(1)),
  kib: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(1)),
  n2: (x) => (x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(2))
}

export function fmtNoise (n) {
  return n.machine !== undefined || n.subjectCore === undefined
    ? `${fmt.pct(n.machine)} (machine)`
    : `${fmt.pct(n.subjectCore)} / ${fmt.pct(n.loadgenCore)}`
}

export function fmtReasons (map) {
  return [...map].map(([r, c]) => `${r} ×${c}`).join(', ')
}

export function banner (text) {
  const line = '!'.repeat(78)
  return `\n${line}\n!! ${text.split('\n').join('\n!! ')}\n${line}\n`
}
