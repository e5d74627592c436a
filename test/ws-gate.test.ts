// Unit tests of src/limits/ws-gate.ts, driven directly (no sockets, no gateway):
//   - OrderedVerdicts: verdicts are handed over in arrival order whatever the answers' latencies (a slow answer holds
//     back a later one that would be ready at once), one check at a time; with nothing waiting, an answer given inside
//     the check's own call is handed over inside submit();
//   - MessageGate over a real LimitStore (in-process: answers inside the call; Redis: answers later): `close` ends
//     the session with 1008 once, `drop` keeps it and tells the client per dropped message; each refusal is one audit
//     line and one resonance_rate_limit_triggered_total{transport="ws"}; a store that refuses (policy closed) ends the
//     session with 1013 and audits nothing, a store that is down under policy open counts in the per-process fallback;
//     a session no longer accepting gets `gone`; an exempt caller gets no gate.
// The session is a recording stand-in for WsSession (what the gate asks of it: terminate, notify, its state).
import { Redis } from 'ioredis'
import pino from 'pino'
import t, { type Test } from 'tap'
import type { FastifyBaseLogger } from 'fastify'
import { LiveConfig } from '../src/config/live.js'
import { loadConfig } from '../src/config/load.js'
import { MessageGate, OrderedVerdicts, Slot, WsLimits, type GatedSession, type MessageOutcome } from '../src/limits/ws-gate.js'
import { ConnectionSlots, WsMessageLimiter, type MessageVerdict } from '../src/limits/ws.js'
import { LimitStore } from '../src/limits/store.js'
import { createAudit } from '../src/observability/audit.js'
import { createMetrics, type Metrics, type WsCloseReason } from '../src/observability/metrics.js'
import { writeYaml } from './helpers/gateway.js'
import { freePort } from './helpers/ports.js'
import { sharedRedis } from './helpers/redis.js'
import { ALICE, auditedRequest } from './helpers/units.js'
import { metric, until, within } from './helpers/wait.js'

const LIMITED = 'resonance_rate_limit_triggered_total{transport="ws"}'
const STORE_ERRORS = 'resonance_rate_limit_store_errors_total'
const log = pino({ level: 'silent' }) as unknown as FastifyBaseLogger

/** What WsSession does for the gate, recorded: terminate() ends it (and it stops accepting), notify() reaches the client. */
class RecordingSession implements GatedSession {
  readonly identity = ALICE
  readonly request = auditedRequest()
  ended: WsCloseReason | undefined
  accepting = true
  readonly terminated: Array<{ reason: WsCloseReason, code: number, text: string }> = []
  readonly notices: string[] = []

  terminate (reason: WsCloseReason, code: number, text: string): void {
    this.terminated.push({ reason, code, text })
    this.ended = reason
    this.accepting = false
  }

  notify (text: string): void { this.notices.push(text) }
}

interface Rig {
  limits: WsLimits
  slots: ConnectionSlots
  metrics: Metrics
  /** The audit trail's lines so far, parsed. */
  audits (): Array<Record<string, unknown>>
  /** A gate for `s` holding a (non-exempt) connection slot. */
  gate (s: GatedSession): MessageGate
}

/** The gate's real collaborators: config, LimitStore, WsMessageLimiter, ConnectionSlots, audit trail and metrics. */
function rig (tt: Test, opts: { action: 'close' | 'drop', max: number, policy?: 'open' | 'closed', fallbackMax?: number, redis?: Redis, prefix?: string }): Rig {
  const env: Record<string, string> = {
    JWT_ISSUER: 'https://id.example.com/realms/r',
    JWT_AUDIENCE: 'gw',
    CONFIG_FILE: writeYaml(''),
    WS_MESSAGE_LIMIT_MAX: String(opts.max),
    WS_MESSAGE_LIMIT_WINDOW: '60s',
    WS_MESSAGE_LIMIT_ACTION: opts.action
  }
  const live = new LiveConfig(loadConfig({ env }), env)
  const metrics = createMetrics()
  const lines: string[] = []
  const audit = createAudit(metrics, { write: (line: string) => { lines.push(line) } })
  const policy = opts.policy ?? 'open'
  const store = new LimitStore({ redis: opts.redis, keyPrefix: opts.prefix ?? '', policy, fallbackMax: opts.fallbackMax, metrics, log })
  const messages = new WsMessageLimiter(store, () => live.current.ws.messageLimit)
  const slots = new ConnectionSlots(undefined, opts.prefix ?? '', () => live.current.ws.maxConnectionsPerUser, policy, metrics, log)
  tt.teardown(() => slots.close())
  const limits = new WsLimits({ live, slots, messages, audit })
  return {
    limits,
    slots,
    metrics,
    audits: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>),
    gate (s) {
      const gate = limits.gate(s, new Slot(slots, s.identity.sub, 'slot-1'))
      if (gate === undefined) throw new Error('a caller with a slot gets a gate')
      return gate
    }
  }
}

/** A Redis client that never connects (lazyConnect, nothing listening): the store sees it not ready, as in an outage. */
async function downRedis (tt: Test): Promise<Redis> {
  const redis = new Redis(await freePort(), '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 1 })
  tt.teardown(() => redis.disconnect())
  return redis
}

/** Submits `n` messages one after another; the outcomes in the order they were handed over. */
function submitAll (gate: MessageGate, n: number): MessageOutcome[] {
  const outcomes: MessageOutcome[] = []
  for (let i = 0; i < n; i++) gate.submit((o) => { outcomes.push(o) })
  return outcomes
}

// --- OrderedVerdicts ------------------------------------------------------------------------------------------------------

t.test('OrderedVerdicts: answers given inside the check are handed over inside submit()', async (t) => {
  let checks = 0
  const verdicts = new OrderedVerdicts((cb) => { cb({ allowed: true, retryAfterSec: ++checks }) })
  const got: number[] = []
  for (let i = 1; i <= 3; i++) {
    verdicts.submit((v) => { got.push(v?.retryAfterSec ?? -1) })
    t.equal(got.length, i, `message ${i}: its verdict was handed over before submit() returned`)
  }
  t.strictSame(got, [1, 2, 3], 'each message got its own check\'s verdict')
})

t.test('OrderedVerdicts: verdicts in arrival order whatever the answers\' latencies; one check at a time', async (t) => {
  // How long the store takes to answer the check of each message: a slow first answer, then answers that would
  // overtake it (inside the call, a microtask, a shorter timer); message 2's store refuses (undefined verdict).
  const latency: Array<'inside the call' | 'microtask' | number> = [40, 'inside the call', 'microtask', 5, 'inside the call']
  let started = 0
  let inFlight = 0
  let maxInFlight = 0
  const verdicts = new OrderedVerdicts((cb) => {
    const k = started++ // checks start in submission order (asserted below through the verdicts)
    inFlight++
    maxInFlight = Math.max(maxInFlight, inFlight)
    const answer = (): void => {
      inFlight--
      cb(k === 2 ? undefined : { allowed: k % 2 === 0, retryAfterSec: k })
    }
    const l = latency[k] ?? 'inside the call'
    if (l === 'inside the call') answer()
    else if (l === 'microtask') queueMicrotask(answer)
    else setTimeout(answer, l)
  })
  const handed: Array<{ message: number, verdict: MessageVerdict | undefined }> = []
  const all = latency.map(async (_l, i) => {
    await new Promise<void>((resolve) => { verdicts.submit((verdict) => { handed.push({ message: i, verdict }); resolve() }) })
  })
  t.strictSame(handed, [], 'nothing handed over while the first answer is pending, not even message 1 whose store answers inside the call')
  t.equal(started, 1, 'only the first check has started: the others wait for its answer')
  await within(Promise.all(all), 3000, 'every verdict')
  t.strictSame(handed.map((h) => h.message), [0, 1, 2, 3, 4], 'handed over in arrival order')
  t.strictSame(handed.map((h) => h.verdict?.retryAfterSec), [0, 1, undefined, 3, 4], 'each message got its own check\'s verdict (the refused one: undefined)')
  t.strictSame(handed.map((h) => h.verdict?.allowed), [true, false, undefined, false, true])
  t.equal(maxInFlight, 1, 'never two checks at once')

  // Nothing waits any more: an answer inside the call is handed over inside submit() again.
  let late: MessageVerdict | undefined
  verdicts.submit((v) => { late = v })
  t.equal(late?.retryAfterSec, 5, 'after the round, the next verdict (inside the call) is handed over at once')
})

// --- MessageGate: the in-process store (answers inside the call) ----------------------------------------------------------

t.test('MessageGate, close: over the limit ends the session once with 1008, one audit line, one count', async (t) => {
  const r = rig(t, { action: 'close', max: 2 })
  const s = new RecordingSession()
  const gate = r.gate(s)
  const outcomes: MessageOutcome[] = []
  for (let i = 1; i <= 4; i++) {
    gate.submit((o) => { outcomes.push(o) })
    t.equal(outcomes.length, i, `message ${i}: outcome before submit() returned (in-process store)`)
  }
  t.strictSame(outcomes, ['allowed', 'allowed', 'refused', 'gone'], 'two allowed; the third closes the session; the fourth finds it closed')
  t.strictSame(s.terminated, [{ reason: 'rate_limited', code: 1008, text: 'message rate limit exceeded' }], 'terminated once, 1008')
  t.strictSame(s.notices, [], 'no drop notice')
  const lines = r.audits()
  t.equal(lines.length, 1, 'one audit line')
  const audited = { event: 'rate_limited', reason: 'ws_message_limit', transport: 'ws', status: 1008, action: 'close', sub: ALICE.sub }
  const request = { ip: '203.0.113.7', method: 'GET', path: '/ws/chat', reqId: 'req-1' }
  t.match(lines[0], { log: 'audit', component: 'audit', msg: 'denied', ...audited, ...request }, 'the denial, and the request without its query')
  t.equal(await metric(r.metrics, LIMITED), 1, 'resonance_rate_limit_triggered_total{transport="ws"} 1')
  t.equal(await metric(r.metrics, STORE_ERRORS), 0, 'no store error')
})

t.test('MessageGate, drop: the session stays, the client is told per dropped message, each audited and counted', async (t) => {
  const r = rig(t, { action: 'drop', max: 2 })
  const s = new RecordingSession()
  const outcomes = submitAll(r.gate(s), 5)
  t.strictSame(outcomes, ['allowed', 'allowed', 'refused', 'refused', 'refused'], 'every message over the limit is refused, in order')
  t.strictSame(s.terminated, [], 'never terminated')
  t.equal(s.notices.length, 3, 'one notice per dropped message')
  for (const notice of s.notices) {
    const n = JSON.parse(notice) as { error: string, error_description: string, retry_after: number }
    t.match(n, { error: 'rate_limited', error_description: 'message dropped: rate limit exceeded' })
    t.ok(Number.isInteger(n.retry_after) && n.retry_after >= 1 && n.retry_after <= 60, `retry_after ${n.retry_after} within the 60 s window`)
  }
  const lines = r.audits()
  t.equal(lines.length, 3, 'one audit line per dropped message')
  t.ok(lines.every((l) => l.reason === 'ws_message_limit' && l.status === 429 && l.action === 'drop' && l.sub === ALICE.sub), 'status 429, action drop')
  t.equal(await metric(r.metrics, LIMITED), 3, 'counted 3 times')
})

t.test('MessageGate: a session no longer accepting gets `gone`, even over the limit: nothing audited or counted', async (t) => {
  const r = rig(t, { action: 'close', max: 1 })
  const s = new RecordingSession()
  const gate = r.gate(s)
  t.strictSame(submitAll(gate, 1), ['allowed'])
  s.accepting = false // the app side closed; the session is not ended yet
  t.strictSame(submitAll(gate, 2), ['gone', 'gone'], 'no message is forwarded or refused')
  t.strictSame(s.terminated, [], 'the gate does not end it')
  t.strictSame(r.audits(), [], 'no audit line')
  t.equal(await metric(r.metrics, LIMITED), 0, 'nothing counted')
})

t.test('MessageGate: the store refuses (RATE_LIMIT_ON_STORE_ERROR=closed): 1013 once, no audit line', async (t) => {
  for (const action of ['close', 'drop'] as const) {
    await t.test(`action ${action}`, async (t) => {
      const r = rig(t, { action, max: 5, policy: 'closed', redis: await downRedis(t) })
      const s = new RecordingSession()
      t.strictSame(submitAll(r.gate(s), 2), ['gone', 'gone'], 'no message can be vouched for')
      t.strictSame(s.terminated, [{ reason: 'rate_limited', code: 1013, text: 'rate limiting unavailable' }], 'terminated once, 1013 try again later')
      t.strictSame(s.notices, [], 'no drop notice')
      t.strictSame(r.audits(), [], 'not a rate-limit denial: no audit line')
      t.equal(await metric(r.metrics, LIMITED), 0, 'nor a count')
      t.equal(await metric(r.metrics, STORE_ERRORS), 2, 'each message a store error')
      t.equal(await metric(r.metrics, 'resonance_rate_limit_store_degraded'), 1, 'the outage is on')
    })
  }
})

t.test('MessageGate: the store is down under policy open: the per-process fallback budget decides', async (t) => {
  for (const action of ['close', 'drop'] as const) {
    await t.test(`action ${action}`, async (t) => {
      const r = rig(t, { action, max: 5, policy: 'open', fallbackMax: 1, redis: await downRedis(t) })
      const s = new RecordingSession()
      const outcomes = submitAll(r.gate(s), 2)
      t.strictSame(outcomes, ['allowed', 'refused'], 'RATE_LIMIT_FALLBACK_MAX=1: one message, then over the limit')
      if (action === 'close') {
        t.strictSame(s.terminated, [{ reason: 'rate_limited', code: 1008, text: 'message rate limit exceeded' }], 'close: 1008, as with the shared store')
        t.equal(s.notices.length, 0)
      } else {
        t.strictSame(s.terminated, [], 'drop: the session stays')
        t.equal(s.notices.length, 1, 'and the client is told')
      }
      t.match(r.audits(), [{ reason: 'ws_message_limit', action, status: action === 'close' ? 1008 : 429 }], 'one audit line')
      t.equal(await metric(r.metrics, LIMITED), 1, 'one count')
      t.equal(await metric(r.metrics, STORE_ERRORS), 2, 'both messages went to the fallback')
    })
  }
})

// --- MessageGate: Redis (answers after the caller's event) ------------------------------------------------------------

t.test('MessageGate over Redis: outcomes after submit() returns, in arrival order, one budget in Redis', async (t) => {
  const shared = await sharedRedis(t)
  const prefix = shared.freshPrefix()
  const r = rig(t, { action: 'drop', max: 3, redis: shared.client, prefix })
  const s = new RecordingSession()
  const outcomes = submitAll(r.gate(s), 6)
  t.strictSame(outcomes, [], 'no outcome before submit() returned: the store answers later')
  await until(() => outcomes.length === 6, 5000, () => `6 outcomes (${outcomes.length} so far)`)
  t.strictSame(outcomes, ['allowed', 'allowed', 'allowed', 'refused', 'refused', 'refused'], 'in arrival order')
  t.equal(s.notices.length, 3, 'one notice per dropped message')
  t.equal(r.audits().length, 3, 'one audit line per dropped message')
  t.equal(await metric(r.metrics, LIMITED), 3)
  t.equal(await metric(r.metrics, STORE_ERRORS), 0, 'Redis answered every check')
  t.equal(await shared.client.get(`${prefix}wsmsg:${ALICE.sub}`), '6', 'one counter in Redis saw every message')
})

// --- WsLimits.gate ------------------------------------------------------------------------------------------------------

t.test('WsLimits.gate: a caller holding a slot gets a gate, an exempt caller (no slot) none', async (t) => {
  const r = rig(t, { action: 'close', max: 1 })
  const s = new RecordingSession()
  t.ok(r.limits.gate(s, new Slot(r.slots, ALICE.sub, 'slot-1')) instanceof MessageGate, 'a slot from the store: gated')
  const exempt = new Slot(undefined, ALICE.sub, '')
  t.equal(exempt.exempt, true)
  t.equal(r.limits.gate(s, exempt), undefined, 'exempt: no message limit')
})
