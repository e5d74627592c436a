// Property test: for what a client sends after the upgrade, the gateway's WebSocket bridge is equivalent to a plain
// `ws` server. Random frame sequences, valid and invalid, are each sent twice by a raw `net` client (handshake by
// hand, token in `Authorization: Bearer`): (a) straight to a `ws` WebSocketServer app, (b) through the gateway to an
// identical app (same maxPayload as WS_MAX_PAYLOAD, perMessageDeflate off, exempt caller: no limiter). Per case:
//   1. the exact list of messages the app's 'message' handler got (text/binary, bytes), and
//   2. the close code the client got in a close frame from its server ("none": the TCP connection ended without one)
// must be equal. The client ends a case when its connection closed (after the server's close frame and FIN, or after
// its own FIN for the cases that end it); the app side once the app's connection closed. Echoes the client got before
// the close are not compared (their order against the close is timing-dependent), nor close reasons (codes are the
// contract). The direct app is the oracle, and it is itself checked against what the generator expects of ws (the
// cases do what they say: a "bad opcode" case really gets 1002, an "oversize" one 1009, ...).
// Seeded: WS_FUZZ_SEED replays a run, WS_FUZZ_CASES sets the number of cases (default 400), WS_FUZZ_ONLY=3,17 runs
// only those case indexes of the seed (each case has its own random stream). A difference listed in
// KNOWN_DIFFERENCES (a documented difference, matched by its exact signature) is reported, not failed; WS_FUZZ_STRICT=1
// fails on those too. Not compared, but
// reported (t.comment): how each TCP connection ended (FIN or reset) and the close code each app saw.
import { randomBytes } from 'node:crypto'
import http from 'node:http'
import { connect, type AddressInfo, type Socket } from 'node:net'
import t from 'tap'
import { WebSocketServer, type WebSocket } from 'ws'
import { startBackends, startGateway } from './helpers/gateway.js'
import { acceptFor, closePayload, frame, FrameReader, handshakeKey, OP, parseClose, RSV, upgradeRequest, type FrameSpec } from './helpers/ws-frames.js'

// --- parameters ------------------------------------------------------------------------------------------------------

/** WS_MAX_PAYLOAD of the gateway and maxPayload of both apps: above 65535, so real 64-bit lengths occur. */
const MAX_PAYLOAD = 70_000
/** ws's default maxFragments (ws 8.23): a message with more fragments is closed with 1008. */
const WS_MAX_FRAGMENTS = 16 * 1024
/** ws terminates a connection with this many automatic pongs not yet written (maxPendingAutoPongs): stay well below. */
const MAX_PINGS_PER_CASE = 20
const CASE_TIMEOUT_MS = 10_000
const CONCURRENCY = 4
const SUB = 'ws-fuzz'

function envInt (name: string, fallback: number): number {
  const raw = process.env[name]
  if (raw === undefined || raw === '') return fallback
  const n = Number(raw)
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${name} must be a non-negative integer, got ${raw}`)
  return n
}

const SEED = envInt('WS_FUZZ_SEED', randomBytes(4).readUInt32BE(0)) >>> 0
const CASES = envInt('WS_FUZZ_CASES', 400)
const ONLY = (process.env.WS_FUZZ_ONLY ?? '').split(',').filter((s) => s.trim() !== '').map((s) => Number(s))
if (ONLY.some((n) => !Number.isSafeInteger(n) || n < 0)) throw new Error(`WS_FUZZ_ONLY must be case indexes, got ${process.env.WS_FUZZ_ONLY}`)
const INDEXES = ONLY.length > 0 ? ONLY : Array.from({ length: CASES }, (_, i) => i)

// --- seeded randomness -----------------------------------------------------------------------------------------------

/** mulberry32: small, fast, good enough for test data; one stream per case, so a case replays on its own. */
class Rng {
  private s: number
  constructor (seed: number) { this.s = seed | 0 }
  float (): number {
    this.s = (this.s + 0x6d2b79f5) | 0
    let x = Math.imul(this.s ^ (this.s >>> 15), 1 | this.s)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }

  /** An integer in [lo, hi]. */
  int (lo: number, hi: number): number { return lo + Math.floor(this.float() * (hi - lo + 1)) }
  chance (p: number): boolean { return this.float() < p }
  pick<T> (items: readonly T[]): T {
    const item = items[Math.floor(this.float() * items.length)]
    if (item === undefined) throw new Error('pick from an empty list')
    return item
  }

  weighted<T> (table: ReadonlyArray<readonly [number, T]>): T {
    const total = table.reduce((s, [w]) => s + w, 0)
    let x = this.float() * total
    for (const [w, v] of table) {
      x -= w
      if (x < 0) return v
    }
    const last = table[table.length - 1]
    if (last === undefined) throw new Error('weighted pick from an empty table')
    return last[1]
  }

  bytes (n: number): Buffer {
    const b = Buffer.alloc(n)
    for (let i = 0; i < n; i += 4) {
      const x = Math.floor(this.float() * 4294967296)
      for (let k = 0; k < 4 && i + k < n; k++) b[i + k] = (x >>> (8 * k)) & 0xff
    }
    return b
  }
}

function caseSeed (seed: number, index: number): number {
  let h = Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(index + 1, 0xc2b2ae35)
  h ^= h >>> 16
  h = Math.imul(h, 0x27d4eb2d)
  h ^= h >>> 15
  return h >>> 0
}

// --- what a case is --------------------------------------------------------------------------------------------------

interface Msg { binary: boolean, data: Buffer }
interface Step { bytes: Buffer, text: string }

/** What ws does with the sequence: the close code the client gets (or 'none') and the messages delivered. */
interface Expected { close: number | 'none', messages: Msg[] }

interface Case {
  index: number
  kind: string
  steps: Step[]
  /** Everything the steps hold; the client sends the first `send` bytes. */
  bytes: Buffer
  send: number
  /** The client ends its side of the TCP connection after sending (the end and truncated kinds). */
  end: boolean
  /** Write boundaries in [0, send): chunk k is bytes[cuts[k], cuts[k+1]). */
  cuts: number[]
  chunking: string
  /** The first chunk rides in the same write as the upgrade request, before the 101. */
  pipelined: boolean
  expected: Expected
}

// --- generator ---------------------------------------------------------------------------------------------------------

const OPNAME: Record<number, string> = { 0: 'cont', 1: 'text', 2: 'binary', 8: 'close', 9: 'ping', 10: 'pong' }
const VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
const INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
const BAD_OPCODES = [3, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf]
const TEXT_POOL = ['a', 'b', 'z', ' ', '0', '~', 'é', 'ß', '€', '中', '😀', '\u0000', '\u007f', '\u0080', '\u07ff', '\uffff', '\u{10ffff}', '\ufffd']
const INVALID_UTF8 = [
  [[0xff], 'byte 0xFF'],
  [[0x80], 'lone continuation byte'],
  [[0xc0, 0x80], 'overlong NUL'],
  [[0xe0, 0x80, 0x80], 'overlong 3-byte'],
  [[0xed, 0xa0, 0x80], 'UTF-16 surrogate'],
  [[0xf4, 0x90, 0x80, 0x80], 'above U+10FFFF'],
  [[0xe2, 0x82], 'truncated sequence'],
  [[0xf8, 0x88, 0x80, 0x80, 0x80], '5-byte form']
] as const

function preview (b: Buffer, max = 20): string {
  const s = b.subarray(0, max).toString('utf8')
  return JSON.stringify(s) + (b.length > max ? '…' : '')
}

function describe (spec: FrameSpec, note: string | undefined): string {
  const payload = Buffer.from(spec.payload ?? new Uint8Array(0))
  const name = OPNAME[spec.opcode] ?? `opcode 0x${spec.opcode.toString(16)}`
  const parts = [name]
  if (spec.fin === false) parts.push('FIN=0')
  if ((spec.rsv ?? 0) !== 0) parts.push(`RSV=${(spec.rsv ?? 0).toString(2).padStart(3, '0')}`)
  if (spec.mask === false) parts.push('UNMASKED')
  else if (spec.mask !== undefined && Buffer.from(spec.mask).equals(Buffer.alloc(4))) parts.push('mask 00000000')
  if (spec.length !== undefined && spec.length !== 'minimal') parts.push(`len${spec.length}`)
  if (spec.declaredLength !== undefined) parts.push(`declares ${spec.declaredLength} B`)
  if (spec.opcode === OP.close && payload.length >= 2) {
    const { code, reason } = parseClose(payload)
    parts.push(`code ${code}${reason.length > 0 ? ` reason ${preview(reason)}` : ''}`)
  }
  parts.push(`${payload.length} B`)
  if (spec.opcode === OP.text || (spec.opcode === OP.continuation && payload.length > 0 && payload.length <= 20)) {
    if (payload.length > 0) parts.push(preview(payload))
  }
  if (note !== undefined) parts.push(`[${note}]`)
  return parts.join(' ')
}

class Gen {
  readonly steps: Step[] = []
  readonly delivered: Msg[] = []
  private pings = 0

  constructor (readonly r: Rng) {}

  /** Appends one frame; random masking key (sometimes all zeroes) unless the spec has one. */
  frame (spec: FrameSpec, note?: string): void {
    const r = this.r
    const full: FrameSpec = { ...spec, mask: spec.mask ?? (r.chance(0.1) ? Buffer.alloc(4) : r.bytes(4)) }
    this.steps.push({ bytes: frame(full), text: describe(full, note) })
  }

  raw (bytes: Buffer, text: string): void { this.steps.push({ bytes, text }) }

  /** A payload size: mostly small, some with 16-bit and 64-bit lengths, up to MAX_PAYLOAD. */
  size (): number {
    const r = this.r
    return r.weighted([
      [10, () => 0],
      [45, () => r.int(1, 125)],
      [25, () => r.int(126, 1000)],
      [12, () => r.int(1001, 20_000)],
      [5, () => r.int(20_001, 65_535)],
      [3, () => r.int(65_536, MAX_PAYLOAD)]
    ])()
  }

  /** Length encoding of a data frame: mostly the shortest, sometimes a longer one (ws accepts those). */
  encoding (n: number): FrameSpec['length'] {
    const r = this.r
    if (!r.chance(0.15)) return 'minimal'
    return n < 65536 && r.chance(0.5) ? '16' : '64'
  }

  text (n: number): Buffer {
    const r = this.r
    const parts: Buffer[] = []
    let len = 0
    while (len < n) {
      const c = Buffer.from(r.pick(TEXT_POOL), 'utf8')
      if (len + c.length > n) {
        parts.push(Buffer.from('x'.repeat(n - len)))
        break
      }
      parts.push(c)
      len += c.length
    }
    return Buffer.concat(parts)
  }

  /** Valid text with one invalid UTF-8 sequence at a character boundary (or at the end). */
  invalidText (n: number): { data: Buffer, note: string } {
    const r = this.r
    const [seq, note] = r.pick(INVALID_UTF8)
    const before = this.text(r.int(0, n))
    const after = note === 'truncated sequence' ? Buffer.alloc(0) : this.text(r.int(0, Math.max(0, n - before.length)))
    return { data: Buffer.concat([before, Buffer.from(seq), after]), note: `invalid UTF-8: ${note}` }
  }

  payload (binary: boolean, n: number): Buffer {
    return binary ? this.r.bytes(n) : this.text(n)
  }

  /** A ping or pong with 0..125 bytes (pongs once the case has had its share of pings). */
  control (): void {
    const r = this.r
    const ping = this.pings < MAX_PINGS_PER_CASE && r.chance(0.6)
    if (ping) this.pings++
    const n = r.chance(0.2) ? 125 : r.int(0, 40)
    this.frame({ opcode: ping ? OP.ping : OP.pong, payload: r.bytes(n) })
  }

  /** `data` as fragments (some possibly empty) with control frames between some of them. */
  fragments (opcode: number, data: Buffer, count: number, finish: boolean): void {
    const r = this.r
    const cuts = Array.from({ length: count - 1 }, () => r.int(0, data.length)).sort((a, b) => a - b)
    const bounds = [0, ...cuts, data.length]
    for (let k = 0; k < count; k++) {
      const part = data.subarray(bounds[k], bounds[k + 1])
      const last = k === count - 1
      this.frame({ opcode: k === 0 ? opcode : OP.continuation, fin: last && finish, payload: part, length: this.encoding(part.length) })
      if (!last && r.chance(0.3)) this.control()
    }
  }

  /** One complete valid message, single frame or fragmented; it is delivered. */
  message (size = this.size(), binary = this.r.chance(0.5)): void {
    const r = this.r
    const data = this.payload(binary, size)
    const opcode = binary ? OP.binary : OP.text
    if (r.chance(0.6)) this.frame({ opcode, payload: data, length: this.encoding(data.length) })
    else this.fragments(opcode, data, r.int(2, 6), true)
    this.delivered.push({ binary, data })
  }

  /** A message started and left open (FIN=0 on every fragment so far); never delivered. */
  openMessage (): void {
    const r = this.r
    const binary = r.chance(0.5)
    const data = this.payload(binary, r.int(0, 300))
    this.fragments(binary ? OP.binary : OP.text, data, r.int(1, 3), false)
  }

  /** 0..5 complete units: messages, pings, pongs. */
  prefix (): void {
    const r = this.r
    const units = r.weighted([[20, 0], [30, 1], [25, 2], [15, 3], [10, 5]])
    for (let i = 0; i < units; i++) {
      if (r.chance(0.7)) this.message()
      else this.control()
    }
  }

  /** Bytes after a close (or after a frame ws fails the connection on): frames ws never reads, or garbage. */
  trailing (): void {
    const r = this.r
    const n = r.int(1, 3)
    for (let i = 0; i < n; i++) {
      r.weighted<() => void>([
        [4, () => {
          const binary = r.chance(0.5)
          this.frame({ opcode: binary ? OP.binary : OP.text, payload: this.payload(binary, r.int(0, 200)) }, 'after the end: never read')
        }],
        [2, () => this.frame({ opcode: OP.close, payload: closePayload(1000) }, 'after the end: never read')],
        [1, () => this.frame({ opcode: OP.ping, payload: r.bytes(4) }, 'after the end: never read')],
        [3, () => this.raw(r.bytes(r.int(1, 40)), 'garbage bytes after the end: never read')]
      ])()
    }
  }
}

type Ending = { close: number | 'none', end?: boolean, truncate?: boolean }

/** Each case kind: its weight, and what it appends after the prefix (returning what ws does then). */
const KINDS: ReadonlyArray<readonly [number, string, (g: Gen) => Ending]> = [
  [12, 'close', (g) => {
    const r = g.r
    const form = r.weighted([[2, 'empty'], [3, 'code'], [3, 'code+reason']])
    const code = r.pick(VALID_CLOSE_CODES)
    const reason = form === 'code+reason' ? g.text(r.chance(0.2) ? 123 : r.int(0, 40)) : undefined
    if (r.chance(0.3)) g.openMessage()
    g.frame({ opcode: OP.close, payload: form === 'empty' ? closePayload() : closePayload(code, reason) })
    if (r.chance(0.4)) g.trailing()
    return { close: form === 'empty' ? 1005 : code }
  }],
  [5, 'end', (g) => {
    if (g.r.chance(0.4)) g.openMessage()
    return { close: 'none', end: true }
  }],
  [10, 'truncated', (g) => {
    const r = g.r
    const open = r.chance(0.3)
    if (open) g.openMessage()
    // the last frame is cut: its header, extended length, mask or payload
    const last = r.weighted<() => void>([
      [6, () => {
        // a continuation of the open message (within maxPayload in all), or a new message
        const binary = r.chance(0.5)
        const n = Math.min(g.size(), MAX_PAYLOAD - 300)
        g.frame({ opcode: open ? OP.continuation : binary ? OP.binary : OP.text, fin: !open || r.chance(0.5), payload: g.payload(binary, n), length: g.encoding(n) })
      }],
      [2, () => g.frame({ opcode: OP.ping, payload: r.bytes(r.int(0, 125)) })],
      [2, () => g.frame({ opcode: OP.close, payload: closePayload(1000, g.text(r.int(0, 60))) })]
    ])
    last()
    return { close: 'none', end: true, truncate: true }
  }],
  [4, 'close-bad-code', (g) => {
    const r = g.r
    if (r.chance(0.3)) g.openMessage()
    g.frame({ opcode: OP.close, payload: closePayload(r.pick(INVALID_CLOSE_CODES), r.chance(0.5) ? g.text(r.int(0, 20)) : undefined) }, 'invalid close code')
    if (r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [2, 'close-length-1', (g) => {
    g.frame({ opcode: OP.close, payload: g.r.bytes(1) }, 'close payload of 1 byte')
    if (g.r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [3, 'close-bad-utf8', (g) => {
    const { data, note } = g.invalidText(g.r.int(0, 60))
    g.frame({ opcode: OP.close, payload: closePayload(g.r.pick(VALID_CLOSE_CODES), data.subarray(0, 123)) }, `reason with ${note}`)
    if (g.r.chance(0.4)) g.trailing()
    return { close: 1007 }
  }],
  [3, 'control-too-long', (g) => {
    const r = g.r
    if (r.chance(0.3)) g.openMessage()
    const opcode = r.pick([OP.ping, OP.pong, OP.close])
    // either really over 125 bytes, or a short payload written with a 16/64-bit length (ws reads only the 7 bits)
    const n = r.chance(0.6) ? r.int(126, 300) : r.int(0, 125)
    const payload = opcode === OP.close ? closePayload(1000, g.text(Math.max(0, n - 2))) : r.bytes(n)
    g.frame({ opcode, payload, length: r.chance(0.7) ? '16' : '64' }, 'control frame with an extended length')
    if (r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [3, 'control-fin0', (g) => {
    const r = g.r
    if (r.chance(0.3)) g.openMessage()
    const opcode = r.pick([OP.ping, OP.pong, OP.close])
    g.frame({ opcode, fin: false, payload: opcode === OP.close ? closePayload(1000) : r.bytes(r.int(0, 20)) }, 'fragmented control frame')
    if (r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [4, 'bad-opcode', (g) => {
    const r = g.r
    if (r.chance(0.4)) g.openMessage()
    g.frame({ opcode: r.pick(BAD_OPCODES), fin: r.chance(0.8), payload: r.bytes(r.int(0, 30)) }, 'reserved opcode')
    if (r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [4, 'rsv', (g) => {
    const r = g.r
    const inMessage = r.chance(0.4)
    if (inMessage) g.openMessage()
    const rsv = r.pick([RSV.rsv1, RSV.rsv2, RSV.rsv3, RSV.rsv1 | RSV.rsv3, 0x7])
    const opcode = inMessage ? r.pick([OP.continuation, OP.ping]) : r.pick([OP.text, OP.binary, OP.ping, OP.pong, OP.close])
    g.frame({ opcode, rsv, payload: opcode === OP.close ? closePayload(1000) : g.payload(opcode === OP.binary, r.int(0, 30)) }, 'RSV bits set, no extension')
    if (r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [4, 'unmasked', (g) => {
    const r = g.r
    const inMessage = r.chance(0.3)
    if (inMessage) g.openMessage()
    const opcode = inMessage ? r.pick([OP.continuation, OP.ping]) : r.pick([OP.text, OP.binary, OP.ping, OP.pong, OP.close])
    g.frame({ opcode, mask: false, payload: opcode === OP.close ? closePayload(1000) : g.payload(opcode === OP.binary, r.int(0, 30)) }, 'client frame without mask')
    if (r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [3, 'orphan-continuation', (g) => {
    const r = g.r
    g.frame({ opcode: OP.continuation, fin: r.chance(0.5), payload: r.bytes(r.int(0, 30)) }, 'continuation with no message open')
    if (r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [3, 'data-while-fragmented', (g) => {
    const r = g.r
    g.openMessage()
    const binary = r.chance(0.5)
    g.frame({ opcode: binary ? OP.binary : OP.text, fin: r.chance(0.7), payload: g.payload(binary, r.int(0, 30)) }, 'new message while one is open')
    if (r.chance(0.4)) g.trailing()
    return { close: 1002 }
  }],
  [5, 'text-invalid-utf8', (g) => {
    const r = g.r
    const { data, note } = g.invalidText(r.chance(0.8) ? r.int(0, 100) : r.int(100, 5000))
    if (r.chance(0.5)) g.frame({ opcode: OP.text, payload: data }, note)
    else {
      g.fragments(OP.text, data, r.int(2, 5), true)
      g.steps[g.steps.length - 1]!.text += ` [message with ${note}]`
    }
    if (r.chance(0.4)) g.trailing()
    return { close: 1007 }
  }],
  [4, 'oversize', (g) => {
    const r = g.r
    const binary = r.chance(0.5)
    const n = r.weighted([[3, MAX_PAYLOAD + 1], [2, r.int(MAX_PAYLOAD + 2, MAX_PAYLOAD + 5000)], [2, r.int(200_000, 2 ** 31)]])
    if (n <= MAX_PAYLOAD + 5000) {
      g.frame({ opcode: binary ? OP.binary : OP.text, payload: g.payload(binary, n), length: r.chance(0.8) ? 'minimal' : '64' }, 'over maxPayload')
    } else {
      // only the header and a little payload: ws refuses on the length alone
      g.frame({ opcode: binary ? OP.binary : OP.text, payload: r.bytes(r.int(0, 100)), declaredLength: BigInt(n) }, 'over maxPayload, payload not sent')
    }
    if (r.chance(0.4)) g.trailing()
    return { close: 1009 }
  }],
  [4, 'oversize-fragments', (g) => {
    // every fragment fits, their sum does not
    const r = g.r
    const binary = r.chance(0.5)
    const count = r.int(2, 5)
    const data = g.payload(binary, MAX_PAYLOAD + r.weighted([[3, 1], [2, r.int(2, 3000)]]))
    const opcode = binary ? OP.binary : OP.text
    const size = Math.ceil(data.length / count)
    for (let k = 0; k < count; k++) {
      const part = data.subarray(k * size, (k + 1) * size)
      g.frame({ opcode: k === 0 ? opcode : OP.continuation, fin: k === count - 1, payload: part, length: g.encoding(part.length) },
        k === count - 1 ? `fragments total ${data.length} B, over maxPayload` : undefined)
      if (k < count - 1 && r.chance(0.3)) g.control()
    }
    if (r.chance(0.4)) g.trailing()
    return { close: 1009 }
  }],
  [3, 'len64-top-bits', (g) => {
    const r = g.r
    const inMessage = r.chance(0.3)
    if (inMessage) g.openMessage()
    const top = r.pick([63n, 62n, 60n, 53n, 56n])
    const declared = (1n << top) | BigInt(r.int(0, 1000))
    const binary = r.chance(0.5)
    g.frame({ opcode: inMessage ? OP.continuation : binary ? OP.binary : OP.text, payload: r.bytes(r.int(0, 50)), declaredLength: declared, length: '64' }, `64-bit length with bit ${top} set`)
    if (r.chance(0.4)) g.trailing()
    return { close: 1009 }
  }],
  [2, 'max-payload', (g) => {
    // exactly maxPayload is allowed, in one frame or summed over fragments
    g.message(MAX_PAYLOAD)
    g.steps[g.steps.length - 1]!.text += ' [message of exactly maxPayload]'
    g.frame({ opcode: OP.close, payload: closePayload(1000) })
    return { close: 1000 }
  }],
  [1, 'many-fragments', (g) => {
    // at ws's fragment limit: delivered; one more: 1008
    const r = g.r
    const over = r.chance(0.5)
    const count = over ? WS_MAX_FRAGMENTS + 1 : WS_MAX_FRAGMENTS
    const binary = r.chance(0.5)
    const parts: Buffer[] = []
    const data: Buffer[] = []
    for (let k = 0; k < count; k++) {
      const part = k % 512 === 0 ? Buffer.from('ab') : Buffer.alloc(0)
      data.push(part)
      parts.push(frame({ opcode: k === 0 ? (binary ? OP.binary : OP.text) : OP.continuation, fin: k === count - 1, payload: part, mask: r.bytes(4) }))
    }
    g.raw(Buffer.concat(parts), `${binary ? 'binary' : 'text'} message in ${count} fragments (ws limit ${WS_MAX_FRAGMENTS})`)
    if (!over) g.delivered.push({ binary, data: Buffer.concat(data) })
    g.frame({ opcode: OP.close, payload: closePayload(1000) })
    return { close: over ? 1008 : 1000 }
  }]
]

function generate (seed: number, index: number): Case {
  const r = new Rng(caseSeed(seed, index))
  const g = new Gen(r)
  const [, kind, make] = r.weighted(KINDS.map((k) => [k[0], k] as const))
  g.prefix()
  // the prefix's messages, and those the ending adds as delivered (max-payload, many-fragments)
  const ending = make(g)
  const messages = g.delivered
  // a quarter of the clients that send a close (or a frame ws fails on) end their side of TCP right after it: the
  // server's close frame must still reach them (they still read)
  const end = ending.end === true || (typeof ending.close === 'number' && r.chance(0.25))
  const bytes = Buffer.concat(g.steps.map((s) => s.bytes))
  let send = bytes.length
  if (ending.truncate === true) {
    // half the cuts fall in the header (2 bytes, extended length, masking key), half anywhere in the frame
    const last = g.steps[g.steps.length - 1]!
    const len7 = (last.bytes[1] ?? 0) & 0x7f
    const headerLen = (len7 === 126 ? 4 : len7 === 127 ? 10 : 2) + 4
    const keep = r.chance(0.5) ? r.int(1, Math.min(headerLen, last.bytes.length - 1)) : r.int(1, last.bytes.length - 1)
    send = bytes.length - last.bytes.length + keep
    last.text += ` [cut after ${keep} of ${last.bytes.length} B: ${keep < headerLen - 4 ? 'in the length' : keep < headerLen ? 'in the masking key' : 'in the payload'}]`
  }
  // write boundaries
  const frameEnds: number[] = []
  let at = 0
  for (const s of g.steps) { at += s.bytes.length; if (at < send) frameEnds.push(at) }
  const mode = r.weighted([[25, 'one write'], [20, 'a write per frame'], [45, 'random splits'], [10, 'byte by byte']] as const)
  let cuts: number[]
  if (mode === 'one write' || send === 0) cuts = [0]
  else if (mode === 'a write per frame') cuts = [0, ...frameEnds]
  else if (mode === 'byte by byte' && send <= 400) cuts = Array.from({ length: send }, (_, i) => i)
  else cuts = [0, ...new Set(Array.from({ length: r.int(1, mode === 'byte by byte' ? 40 : 10) }, () => r.int(1, Math.max(1, send - 1))))].sort((a, b) => a - b)
  cuts = [...new Set(cuts)].filter((c) => c < send || c === 0).sort((a, b) => a - b)
  const chunking = cuts.length <= 1 ? 'one write' : `${cuts.length} writes${mode === 'random splits' || mode === 'byte by byte' ? ` (${mode}: at ${cuts.slice(1, 12).join(',')}${cuts.length > 12 ? ',…' : ''})` : ` (${mode})`}`
  return {
    index,
    kind,
    steps: g.steps,
    bytes,
    send,
    end,
    cuts,
    chunking,
    pipelined: send > 0 && r.chance(0.1),
    expected: { close: ending.close, messages }
  }
}

function describeCase (c: Case): string[] {
  return [
    `kind ${c.kind}; ${c.send} of ${c.bytes.length} B sent in ${c.chunking}${c.pipelined ? ', the first with the upgrade request' : ''}${c.end ? ', then the client ends TCP' : ''}`,
    ...c.steps.map((s, i) => `  ${i + 1}. ${s.text}`)
  ]
}

// --- the apps: plain ws servers that record and echo ---------------------------------------------------------------------

interface AppConn {
  messages: Msg[]
  closed?: { code: number, reason: string }
  done: Promise<void>
  markDone: () => void
}

interface App {
  url: string
  port: number
  conn (path: string): AppConn
  close (): Promise<void>
}

async function startApp (): Promise<App> {
  const conns = new Map<string, AppConn>()
  const conn = (path: string): AppConn => {
    let c = conns.get(path)
    if (c === undefined) {
      let markDone = (): void => {}
      const done = new Promise<void>((resolve) => { markDone = resolve })
      c = { messages: [], done, markDone }
      conns.set(path, c)
    }
    return c
  }
  const server = http.createServer((_req, res) => { res.writeHead(404).end() })
  const wss = new WebSocketServer({ server, maxPayload: MAX_PAYLOAD, perMessageDeflate: false })
  wss.on('connection', (ws: WebSocket, req: http.IncomingMessage) => {
    const rec = conn(req.url ?? '/')
    ws.on('message', (data, isBinary) => {
      const bytes = Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data)
      rec.messages.push({ binary: isBinary, data: Buffer.from(bytes) })
      ws.send(bytes, { binary: isBinary })
    })
    ws.on('close', (code, reason) => {
      rec.closed = { code, reason: reason.toString('utf8') }
      rec.markDone()
    })
    ws.on('error', () => {})
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    conn,
    async close () {
      for (const c of wss.clients) c.terminate()
      await new Promise<void>((resolve) => wss.close(() => resolve()))
      const closed = new Promise<void>((resolve) => server.close(() => resolve()))
      server.closeAllConnections()
      await closed
    }
  }
}

// --- the raw client ------------------------------------------------------------------------------------------------------

interface Observed {
  /** Code of the first close frame the client got (1005: one without a code), or 'none'. */
  close: number | 'none'
  closeReason: string
  /** How the client's TCP connection ended: 'fin', an error code (ECONNRESET, EPIPE), or 'closed' (neither seen). */
  tcp: string
  messages: Msg[]
  /** What the app's ws reported at its close, or 'timeout' when its connection did not close. */
  app: string
  problems: string[]
}

const sockets = new Set<Socket>()

function deadline (ms: number): { promise: Promise<'timeout'>, cancel: () => void } {
  let timer: NodeJS.Timeout | undefined
  const promise = new Promise<'timeout'>((resolve) => { timer = setTimeout(() => resolve('timeout'), ms) })
  return { promise, cancel: () => clearTimeout(timer) }
}

async function observe (port: number, app: App, path: string, c: Case, token: string): Promise<Observed> {
  const problems: string[] = []
  const socket = connect(port, '127.0.0.1')
  sockets.add(socket)
  socket.setNoDelay(true)
  const reader = new FrameReader()
  let close: { code: number, reason: Buffer } | undefined
  let head: Buffer | undefined = Buffer.alloc(0)
  let sawEnd = false
  let error: string | undefined
  let onHeaders: (status: string) => void = () => {}
  const headers = new Promise<string>((resolve) => { onHeaders = resolve })
  const key = handshakeKey()
  socket.on('data', (chunk: Buffer) => {
    let rest = chunk
    if (head !== undefined) {
      head = Buffer.concat([head, chunk])
      const end = head.indexOf('\r\n\r\n')
      if (end < 0) return
      const response = head.subarray(0, end).toString('latin1')
      rest = head.subarray(end + 4)
      head = undefined
      onHeaders(response)
    }
    for (const f of reader.push(rest)) {
      if (f.opcode === OP.close && close === undefined) close = parseClose(f.payload)
    }
  })
  socket.on('end', () => { sawEnd = true })
  socket.on('error', (err: NodeJS.ErrnoException) => { error ??= err.code ?? err.message })
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()))

  const write = (chunk: Buffer | string): Promise<void> => new Promise((resolve) => {
    socket.write(chunk, () => { setImmediate(resolve) })
  })
  const writable = (): boolean => !socket.destroyed && !socket.writableEnded && !sawEnd

  const chunks = c.cuts.map((from, k) => c.bytes.subarray(from, c.cuts[k + 1] ?? c.send))
  const limit = deadline(CASE_TIMEOUT_MS)
  try {
    await Promise.race([new Promise<void>((resolve) => socket.once('connect', () => resolve())), closed])
    const request = upgradeRequest(`127.0.0.1:${port}`, path, key, { Authorization: `Bearer ${token}` })
    const first = c.pipelined ? chunks.shift() : undefined
    await write(first === undefined ? request : Buffer.concat([Buffer.from(request, 'latin1'), first]))
    const response = await Promise.race([headers, closed.then(() => 'connection closed'), limit.promise])
    const status = response.split('\r\n')[0] ?? ''
    if (!status.startsWith('HTTP/1.1 101 ')) throw new Error(`the upgrade of ${path} was answered ${JSON.stringify(status)}`)
    if (!response.toLowerCase().includes(`sec-websocket-accept: ${acceptFor(key).toLowerCase()}`)) throw new Error(`the 101 for ${path} has a wrong Sec-WebSocket-Accept`)
    for (const chunk of chunks) {
      if (!writable()) break
      await write(chunk)
    }
    if (c.end && writable()) socket.end()
    if (await Promise.race([closed, limit.promise]) === 'timeout') {
      problems.push(`the client connection was still open after ${CASE_TIMEOUT_MS} ms`)
      socket.destroy()
    }
    const rec = app.conn(path)
    if (await Promise.race([rec.done, limit.promise]) === 'timeout') problems.push(`the app connection was still open after ${CASE_TIMEOUT_MS} ms`)
    return {
      close: close?.code ?? 'none',
      closeReason: close?.reason.toString('utf8') ?? '',
      tcp: error ?? (sawEnd ? 'fin' : 'closed'),
      messages: rec.messages,
      app: rec.closed === undefined ? 'timeout' : String(rec.closed.code),
      problems
    }
  } finally {
    limit.cancel()
    socket.destroy()
    sockets.delete(socket)
  }
}

// --- comparison ------------------------------------------------------------------------------------------------------------

function msgKey (m: Msg): string { return `${m.binary ? 'b' : 't'}:${m.data.toString('hex')}` }

function showMessages (ms: Msg[]): string[] {
  return ms.map((m) => `${m.binary ? 'binary' : 'text'} ${m.data.length} B${m.binary ? '' : ` ${preview(m.data, 30)}`}`)
}

function sameMessages (a: Msg[], b: Msg[]): boolean {
  return a.length === b.length && a.every((m, i) => msgKey(m) === msgKey(b[i] as Msg))
}

function show (o: Observed | Expected): Record<string, unknown> {
  const out: Record<string, unknown> = { close: o.close, messages: showMessages(o.messages) }
  if ('tcp' in o) Object.assign(out, { closeReason: o.closeReason, tcp: o.tcp, appClose: o.app }, o.problems.length > 0 ? { problems: o.problems } : {})
  return out
}

// --- differences of the current bridge -----------------------------------------------------------------------------------

/**
 * Differences of the bridge this test was written against (42b92a0: ws decoding and re-framing on both sides), each
 * recognised by its exact signature and reported rather than failed. WS_FUZZ_STRICT=1 fails on them;
 * once no gateway in use has them, the entry goes.
 */
const KNOWN_DIFFERENCES: ReadonlyArray<{ id: string, explain: string, matches: (d: Observed, g: Observed, c: Case) => boolean }> = [{
  id: 'UTF-8 left to the app',
  explain: 'the relay does not decode payloads (README, WebSockets, Relay): a text message with invalid UTF-8 goes to the ' +
    'app, whose ws closes with 1007; when the client has already sent a frame that the relay refuses itself, the relay\'s ' +
    '1002 or 1009 reaches the client before the app\'s 1007 does. ws stops reading at the invalid message. The app gets ' +
    'the same messages either way.',
  matches: (d, g, c) => c.kind === 'text-invalid-utf8' && d.close === 1007 && (g.close === 1002 || g.close === 1009) &&
    g.problems.length === 0 && sameMessages(d.messages, g.messages)
}]
const STRICT = process.env.WS_FUZZ_STRICT === '1'

// --- the tests -------------------------------------------------------------------------------------------------------------

t.test('frame helpers: RFC 6455 §5.7 examples, and the reader in any chunking', async (t) => {
  const hex = (b: Buffer): string => b.toString('hex')
  const hello = Buffer.from('Hello')
  t.equal(hex(frame({ opcode: OP.text, payload: hello, mask: false })), '810548656c6c6f', 'unmasked text "Hello"')
  t.equal(hex(frame({ opcode: OP.text, payload: hello, mask: Buffer.from([0x37, 0xfa, 0x21, 0x3d]) })), '818537fa213d7f9f4d5158', 'masked text "Hello"')
  t.equal(hex(frame({ opcode: OP.text, fin: false, payload: Buffer.from('Hel'), mask: false })), '010348656c', 'first fragment')
  t.equal(hex(frame({ opcode: OP.continuation, payload: Buffer.from('lo'), mask: false })), '80026c6f', 'last fragment')
  t.equal(hex(frame({ opcode: OP.ping, payload: hello, mask: false })), '890548656c6c6f', 'unmasked ping')
  t.equal(hex(frame({ opcode: OP.binary, payload: Buffer.alloc(256), mask: false }).subarray(0, 4)), '827e0100', '256 bytes: 16-bit length')
  t.equal(hex(frame({ opcode: OP.binary, payload: Buffer.alloc(65536), mask: false }).subarray(0, 10)), '827f0000000000010000', '64 KiB: 64-bit length')
  t.equal(hex(frame({ opcode: OP.binary, payload: Buffer.alloc(3), mask: false, length: '64' }).subarray(0, 10)), '827f0000000000000003', 'a longer length encoding on request')
  t.equal(hex(frame({ opcode: OP.text, rsv: RSV.rsv1 | RSV.rsv3, payload: Buffer.alloc(0), mask: false })), 'd100', 'RSV bits')
  t.equal(hex(frame({ opcode: OP.binary, declaredLength: 1n << 63n, mask: false })), '827f8000000000000000', 'a declared length that lies')

  const r = new Rng(1)
  const specs: FrameSpec[] = Array.from({ length: 50 }, (_, i) => ({ opcode: i % 3, fin: i % 2 === 0, payload: r.bytes(r.int(0, i * 50)), mask: i % 4 === 0 ? false : r.bytes(4) }))
  const stream = Buffer.concat(specs.map((s) => frame(s)))
  const reader = new FrameReader()
  let at = 0
  while (at < stream.length) {
    const n = r.int(1, 300)
    reader.push(stream.subarray(at, at + n))
    at += n
  }
  t.equal(reader.frames.length, specs.length, 'every frame read back')
  t.ok(reader.frames.every((f, i) => f.opcode === specs[i]?.opcode && f.fin === specs[i]?.fin && f.masked === (specs[i]?.mask !== false) &&
    f.payload.equals(Buffer.from(specs[i]?.payload ?? new Uint8Array(0)))), 'opcode, FIN, mask bit and unmasked payload round-trip')
  t.equal(reader.pending, 0)
  t.same(parseClose(closePayload(4000, Buffer.from('bye'))), { code: 4000, reason: Buffer.from('bye') })
  t.equal(parseClose(closePayload()).code, 1005, 'a close without a code reads as 1005')
})

t.test(`the gateway's WebSocket bridge is equivalent to a plain ws server (${INDEXES.length} random client frame sequences)`, async (t) => {
  t.comment(`seed ${SEED} (replay: WS_FUZZ_SEED=${SEED} WS_FUZZ_CASES=${CASES}; one case: WS_FUZZ_SEED=${SEED} WS_FUZZ_ONLY=<index>)`)
  const started = Date.now()
  const { issuer, upstream } = await startBackends(t)
  const direct = await startApp()
  t.teardown(() => direct.close())
  const behind = await startApp()
  t.teardown(() => behind.close())
  t.teardown(() => { for (const s of sockets) s.destroy() })
  const g = await startGateway(t, issuer, upstream, {
    env: {
      UPSTREAM_URL: behind.url,
      WS_MAX_PAYLOAD: String(MAX_PAYLOAD),
      // no liveness traffic or closes of the gateway's own during a case
      WS_PING_INTERVAL: '600s',
      WS_IDLE_TIMEOUT: '0',
      MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: '0',
      LOG_LEVEL: 'warn'
    },
    // the caller is exempt: no request limit on the upgrades, no connection cap, no message limit
    yaml: `rateLimit:\n  exempt:\n    subs: [${SUB}]\n`
  })
  const gatewayPort = Number(new URL(g.url).port)
  const token = await issuer.token({ sub: SUB, ttlSeconds: 3600 })

  let ran = 0
  let reported = 0
  const oracleFailures: number[] = []
  const notRun: number[] = []
  const differences = new Map<string, number[]>()
  const knownSeen = new Map<string, Map<string, number[]>>()
  /** Not compared: per kind, how TCP ended and the code each app saw ("direct tcp/app -> gateway tcp/app"). */
  const notes = new Map<string, Map<string, number>>()
  const queue = [...INDEXES]

  const fail = (c: Case, what: string, diag: Record<string, unknown>): void => {
    if (reported++ >= 20) return // the rest are counted below
    t.fail(`case ${c.index} (${c.kind}): ${what}; replay: WS_FUZZ_SEED=${SEED} WS_FUZZ_ONLY=${c.index}`, {
      seed: SEED, case: c.index, sequence: describeCase(c), ...diag
    })
  }

  const runOne = async (index: number): Promise<void> => {
    const c = generate(SEED, index)
    const path = `/ws/fuzz/${SEED}/${index}`
    let d: Observed
    let gw: Observed
    try {
      [d, gw] = await Promise.all([observe(direct.port, direct, path, c, token), observe(gatewayPort, behind, path, c, token)])
    } catch (err) {
      notRun.push(index)
      fail(c, `the case could not run: ${err instanceof Error ? err.message : String(err)}`, {})
      return
    }
    ran++
    const note = `TCP ${d.tcp === gw.tcp ? d.tcp : `${d.tcp} -> ${gw.tcp}`}, app close ${d.app === gw.app ? 'same' : `${d.app} -> ${gw.app}`}`
    const byKind = notes.get(c.kind) ?? new Map<string, number>()
    byKind.set(note, (byKind.get(note) ?? 0) + 1)
    notes.set(c.kind, byKind)
    if (d.problems.length > 0 || d.close !== c.expected.close || !sameMessages(d.messages, c.expected.messages)) {
      oracleFailures.push(index)
      fail(c, 'the direct ws server did not do what the generator expects of ws (a generator bug, or ws changed)', { expected: show(c.expected), direct: show(d) })
      return
    }
    const why: string[] = []
    if (gw.problems.length > 0) why.push(...gw.problems)
    if (gw.close !== d.close) why.push(`close code ${String(gw.close)} through the gateway, ${String(d.close)} direct`)
    if (!sameMessages(gw.messages, d.messages)) why.push(`the app got ${gw.messages.length} message(s) through the gateway, ${d.messages.length} direct, or other bytes`)
    if (why.length === 0) return
    const known = KNOWN_DIFFERENCES.find((k) => k.matches(d, gw, c))
    if (known !== undefined && !STRICT) {
      const byKind = knownSeen.get(known.id) ?? new Map<string, number[]>()
      byKind.set(c.kind, [...(byKind.get(c.kind) ?? []), index])
      knownSeen.set(known.id, byKind)
      t.comment(`case ${c.index} (${c.kind}): ${why.join('; ')} [documented difference: ${known.id}; WS_FUZZ_STRICT=1 fails on it]; ` +
        `replay: WS_FUZZ_SEED=${SEED} WS_FUZZ_ONLY=${c.index}`)
      return
    }
    differences.set(c.kind, [...(differences.get(c.kind) ?? []), index])
    fail(c, why.join('; ') + (known !== undefined ? ` [known: ${known.id}, failing under WS_FUZZ_STRICT=1]` : ''), { direct: show(d), gateway: show(gw) })
  }

  await Promise.all(Array.from({ length: CONCURRENCY }, async () => {
    for (let i = queue.shift(); i !== undefined; i = queue.shift()) await runOne(i)
  }))

  t.comment(`cases run: ${ran} of ${INDEXES.length} requested, in ${((Date.now() - started) / 1000).toFixed(1)} s (seed ${SEED})`)
  for (const [kind, byNote] of [...notes].sort(([a], [b]) => a.localeCompare(b))) {
    const counts = [...byNote].sort(([, a], [, b]) => b - a).map(([n, k]) => `${k}x ${n}`).join(', ')
    t.comment(`  ${kind} (not compared; direct -> gateway): ${counts}`)
  }
  for (const k of KNOWN_DIFFERENCES) {
    const seen = knownSeen.get(k.id)
    if (seen === undefined) continue
    t.comment(`known difference "${k.id}" (documented; WS_FUZZ_STRICT=1 fails on it) in ${[...seen].map(([kind, ids]) => `${kind}: cases ${ids.join(', ')}`).join('; ')}: ${k.explain}`)
  }
  t.strictSame(notRun, [], 'no case failed to run (upgrade refused, connection failed)')
  t.equal(ran, INDEXES.length, 'every requested case ran')
  t.strictSame(oracleFailures, [], 'the direct ws server did what each case expects of ws')
  t.strictSame(Object.fromEntries(differences), {}, `no case differs between the gateway and a plain ws server (case indexes by kind; seed ${SEED})`)
  if (reported > 20) t.comment(`${reported - 20} more failing cases not shown`)
})
