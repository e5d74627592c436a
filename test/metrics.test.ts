// The WebSocket message counts are kept in plain numbers and handed to prom-client at scrape time
// (src/observability/metrics.ts): every increment arrives once. The request metrics' equivalence with prom-client's own
// Counter and Histogram is a contract test (test/contracts.test.ts).
import t from 'tap'
import { createMetrics } from '../src/observability/metrics.js'

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
