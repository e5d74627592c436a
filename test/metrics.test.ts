// The hot-path request metrics are kept in plain arrays and exported through prom-client's Registry at scrape time
// (src/observability/metrics.ts). What Prometheus scrapes must be exactly what prom-client's own Counter and
// Histogram would have produced for the same observations: same series, labels, buckets, sums and counts.
import t from 'tap'
import { Counter, Histogram, Registry } from 'prom-client'
import { createMetrics } from '../src/observability/metrics.js'

const BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
const CLASSES = ['1xx', '2xx', '3xx', '4xx', '5xx']

function series (text: string, prefix: string): string[] {
  return text.split('\n').filter((l) => l.startsWith(prefix)).sort()
}

t.test('request metrics: identical to prom-client\'s own Counter and Histogram', async (t) => {
  const m = createMetrics()
  const ref = new Registry()
  const refCount = new Counter({ name: 'resonance_http_requests_total', help: 'x', labelNames: ['status_class'], registers: [ref] })
  const refHist = new Histogram({ name: 'resonance_http_request_duration_seconds', help: 'x', labelNames: ['status_class'], buckets: BUCKETS, registers: [ref] })
  for (const c of CLASSES) { refCount.labels(c).inc(0); refHist.zero({ status_class: c }) }

  // Values on and around every bucket bound, very large and zero, every status class, odd statuses.
  const values = [0, 1e-6, ...BUCKETS.flatMap((b) => [b * 0.999, b, b * 1.001]), 42, 1e6]
  const statuses = [101, 200, 204, 302, 401, 404, 429, 500, 502, 504, 99, 600]
  let i = 0
  const check = async (what: string): Promise<void> => {
    const ours = await m.registry.metrics()
    const theirs = await ref.metrics()
    t.same(series(ours, 'resonance_http_request_duration_seconds'), series(theirs, 'resonance_http_request_duration_seconds'), `${what}: histogram series identical`)
    t.same(series(ours, 'resonance_http_requests_total'), series(theirs, 'resonance_http_requests_total'), `${what}: counter series identical`)
  }
  await check('nothing observed')
  for (const s of statuses) {
    for (const v of values) {
      m.observeRequest(s, v)
      const c = Math.floor(s / 100)
      const cls = c >= 1 && c <= 5 ? `${c}xx` : '5xx'
      refCount.labels(cls).inc()
      refHist.labels(cls).observe(v)
      i++
    }
    await check(`after ${i} observations`) // scraping in between must not lose or double anything
  }
  await check('scraped twice in a row')
})

t.test('WebSocket message counts: increments between scrapes all arrive, none twice', async (t) => {
  const m = createMetrics()
  const read = async (): Promise<number[]> => {
    const text = await m.registry.metrics()
    return ['client_to_app', 'app_to_client'].map((d) => Number(new RegExp(`resonance_ws_messages_total\\{direction="${d}"\\} (\\d+)`).exec(text)?.[1]))
  }
  t.same(await read(), [0, 0], 'series exist from the start')
  for (let k = 0; k < 5; k++) m.wsMessages.client_to_app.inc()
  m.wsMessages.app_to_client.inc()
  t.same(await read(), [5, 1])
  t.same(await read(), [5, 1], 'a second scrape adds nothing')
  for (let k = 0; k < 3; k++) m.wsMessages.app_to_client.inc()
  t.same(await read(), [5, 4])
})
