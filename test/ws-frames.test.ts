// Properties of the relay's frame reading (src/proxy/ws-frames.ts), on random valid frame streams cut at random
// offsets: the client-side reader hands over every byte exactly once, in order, each marked with the message it belongs
// to (control frames unmarked, close frames whole); the app-side scanner stops exactly at frame and message ends and
// counts messages. End-to-end equivalence with a ws server is test/ws-relay-equivalence.test.ts.
import t from 'tap'
import { AppFrameScanner, ClientFrameReader, closeFrame, frame as relayFrame, OPCODE, UNTIL, type ClientFrameSink, type Until } from '../src/proxy/ws-frames.js'
import { frame, OP } from './helpers/ws-frames.js'

const SEED = Number(process.env.WS_FRAMES_SEED ?? (Date.now() % 2 ** 31))
const CASES = 300

/** mulberry32 */
function prng (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let x = a
    x = Math.imul(x ^ (x >>> 15), x | 1)
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61)
    return ((x ^ (x >>> 14)) >>> 0) / 2 ** 32
  }
}

/** messageEnds: every frame end outside a fragmented message. */
interface Built { bytes: Buffer, frameEnds: number[], messageEnds: number[], messages: number, closeEnd: number | undefined }

/** A random valid stream: messages (some fragmented, control frames inside), sometimes a close at the end. */
function stream (rnd: () => number, masked: boolean): Built {
  const parts: Buffer[] = []
  const frameEnds: number[] = []
  const messageEnds: number[] = []
  let at = 0
  const push = (b: Buffer, endsMessage: boolean): void => {
    parts.push(b)
    at += b.length
    frameEnds.push(at)
    if (endsMessage) messageEnds.push(at)
  }
  const size = (): number => { const r = rnd(); return r < 0.6 ? Math.floor(rnd() * 126) : r < 0.9 ? 126 + Math.floor(rnd() * 3000) : 65_536 + Math.floor(rnd() * 10_000) }
  const mask = masked ? undefined : false as const
  // a control frame between messages ends at a message boundary too (a whole message may go in there)
  const control = (inMessage: boolean): void => { push(frame({ opcode: rnd() < 0.5 ? OP.ping : OP.pong, payload: Buffer.alloc(Math.floor(rnd() * 126), 7), mask }), !inMessage) }
  const messages = 1 + Math.floor(rnd() * 8)
  for (let m = 0; m < messages; m++) {
    if (rnd() < 0.3) control(false)
    const fragments = rnd() < 0.6 ? 1 : 2 + Math.floor(rnd() * 4)
    for (let f = 0; f < fragments; f++) {
      const last = f === fragments - 1
      push(frame({ opcode: f === 0 ? (rnd() < 0.5 ? OP.text : OP.binary) : OP.continuation, fin: last, payload: Buffer.alloc(size(), 0x61), mask }), last)
      if (!last && rnd() < 0.3) control(true)
    }
  }
  let closeEnd: number | undefined
  if (rnd() < 0.5) {
    push(frame({ opcode: OP.close, payload: Buffer.from([0x03, 0xe8, 0x6f, 0x6b]), mask }), false)
    closeEnd = at
  }
  return { bytes: Buffer.concat(parts), frameEnds, messageEnds, messages, closeEnd }
}

/** The stream cut at random offsets into 1 to 20 chunks (sometimes 1-byte ones). */
function chunks (rnd: () => number, bytes: Buffer): Buffer[] {
  const cuts = new Set<number>()
  const n = Math.floor(rnd() * 20)
  for (let i = 0; i < n; i++) cuts.add(rnd() < 0.3 ? Math.floor(rnd() * Math.min(40, bytes.length)) : Math.floor(rnd() * bytes.length))
  const sorted = [...cuts].filter((c) => c > 0).sort((a, b) => a - b)
  const out: Buffer[] = []
  let from = 0
  for (const c of sorted) { out.push(bytes.subarray(from, c)); from = c }
  out.push(bytes.subarray(from))
  return out.filter((c) => c.length > 0)
}

t.test(`ClientFrameReader: every byte handed over once, in order, marked by message (${CASES} random streams, seed ${SEED})`, async (t) => {
  const rnd = prng(SEED)
  let failures = 0
  for (let c = 0; c < CASES && failures < 5; c++) {
    const s = stream(rnd, true)
    const out: Buffer[] = []
    const marks: Array<number | null> = []
    let started = 0
    let close: Buffer | undefined
    let violation: number | undefined
    const sink: ClientFrameSink<number> = {
      messageStart: () => ++started,
      bytes: (chunk, from, to, mark) => { out.push(Buffer.from(chunk.subarray(from, to))); for (let i = from; i < to; i++) marks.push(mark) },
      pong: () => {},
      closed: (bytes) => { close = Buffer.from(bytes) },
      violation: (code) => { violation = code }
    }
    const reader = new ClientFrameReader(1 << 20, sink)
    for (const chunk of chunks(rnd, s.bytes)) reader.feed(chunk)
    const passed = Buffer.concat(out)
    const expected = s.closeEnd === undefined ? s.bytes : s.bytes.subarray(0, s.frameEnds[s.frameEnds.length - 2] ?? 0)
    const ok = violation === undefined && started === s.messages && passed.equals(expected) &&
      (s.closeEnd === undefined ? close === undefined : close?.equals(s.bytes.subarray(expected.length)) === true)
    if (!ok) {
      failures++
      t.fail(`case ${c}: violation ${violation}, ${started}/${s.messages} messages, ${passed.length}/${expected.length} bytes, close ${close?.length}`)
    }
    // marks: a data message's bytes carry its number, counted from 1 in stream order (never decreasing)
    let last = 0
    for (const m of marks) if (m !== null) { if (m < last) { failures++; t.fail(`case ${c}: marks out of order`); break } last = m }
  }
  t.equal(failures, 0, `${CASES} streams read with no difference (seed ${SEED}; replay with WS_FRAMES_SEED)`)
})

t.test(`AppFrameScanner: stops exactly at frame and message ends, counts messages (${CASES} random streams, seed ${SEED})`, async (t) => {
  const rnd = prng(SEED + 1)
  let failures = 0
  for (let c = 0; c < CASES && failures < 5; c++) {
    const s = stream(rnd, false)
    const until: Until = rnd() < 0.5 ? UNTIL.frame : UNTIL.message
    const wanted = until === UNTIL.frame ? s.frameEnds : s.messageEnds
    const scanner = new AppFrameScanner(1 << 20)
    const stops: number[] = []
    let base = 0
    let closedAt: number | undefined
    for (const chunk of chunks(rnd, s.bytes)) {
      let from = 0
      while (from < chunk.length && closedAt === undefined) {
        const to = scanner.scan(chunk, from, until)
        if (scanner.stop === 'boundary') stops.push(base + to)
        if (scanner.stop === 'close') closedAt = base + to
        if (to === chunk.length && scanner.stop === 'boundary' && (until === UNTIL.frame ? !scanner.atFrameBoundary : !scanner.atMessageBoundary)) { failures++; t.fail(`case ${c}: not at a boundary after stopping at one`) }
        from = to
      }
      base += chunk.length
    }
    const expectStops = wanted.filter((e) => s.closeEnd === undefined || e < s.closeEnd)
    if (JSON.stringify(stops) !== JSON.stringify(expectStops) || closedAt !== s.closeEnd || scanner.messages !== s.messages) {
      failures++
      t.fail(`case ${c} (until ${until}): stops ${stops.length}/${expectStops.length}, close ${closedAt}/${s.closeEnd}, messages ${scanner.messages}/${s.messages}`)
    }
  }
  t.equal(failures, 0, `${CASES} streams scanned with no difference (seed ${SEED}; replay with WS_FRAMES_SEED)`)
})

t.test('AppFrameScanner: a message over the cap stops before its header; fragments count together', async (t) => {
  const scanner = new AppFrameScanner(100)
  const first = frame({ opcode: OP.text, fin: false, payload: Buffer.alloc(60), mask: false })
  const second = frame({ opcode: OP.continuation, payload: Buffer.alloc(41), mask: false })
  const both = Buffer.concat([first, second])
  t.equal(scanner.scan(both, 0, UNTIL.none), first.length, 'stopped where the fragment that passes the cap starts')
  t.equal(scanner.stop, 'too_big')
  const ok = new AppFrameScanner(100)
  t.equal(ok.scan(Buffer.concat([first, frame({ opcode: OP.continuation, payload: Buffer.alloc(40), mask: false })]), 0, UNTIL.none), first.length + 42, 'exactly the cap passes')
  t.equal(ok.messages, 1)
})

t.test('frames the gateway writes', async (t) => {
  t.equal(closeFrame(1008, 'token expired', false).toString('hex'), '880f03f0' + Buffer.from('token expired').toString('hex'), 'an unmasked close with code and reason')
  t.equal(closeFrame(undefined, '', false).toString('hex'), '8800', 'a close without a code')
  const masked = closeFrame(1001, 'bye', true)
  t.equal(masked[1], 0x80 | 5, 'masked, 5 bytes of payload')
  const key = masked.subarray(2, 6)
  const payload = Buffer.from(masked.subarray(6).map((b, i) => b ^ (key[i & 3] as number)))
  t.equal(payload.readUInt16BE(0), 1001)
  t.equal(payload.subarray(2).toString(), 'bye')
  t.equal(closeFrame(1000, 'x'.repeat(300), false).length, 2 + 125, 'a reason is cut to what a control frame holds')
  t.equal(relayFrame(OPCODE.text, Buffer.alloc(70_000), false).subarray(0, 10).toString('hex'), '817f0000000000011170', '64-bit length')
})
