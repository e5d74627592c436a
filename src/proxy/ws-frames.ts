/**
 * WebSocket framing (RFC 6455 §5), the part a byte relay needs. After the
 * handshake the gateway relays bytes unchanged both ways and reads only frame
 * headers:
 *   ClientFrameReader  client -> app: validates every header the way the `ws`
 *                      library's receiver does (same checks, same order, same
 *                      close codes), tells which data message each byte
 *                      belongs to (so a message can wait for its limit check
 *                      or be skipped whole), enforces the message size cap
 *                      and reads close frames;
 *   AppFrameScanner    app -> client: finds frame and message boundaries (the
 *                      gateway's own frames go in between), the app's close
 *                      frame and messages over the size cap; no other checks:
 *                      the client's WebSocket library validates what the app
 *                      sends.
 * Payloads are never unmasked or copied, except a close frame's (at most 125
 * bytes). UTF-8 of text messages is left to the receiving endpoint: a `ws`
 * app closes with 1007, as `ws` in the gateway did.
 */
import { createHash, randomBytes } from 'node:crypto'
import { isUtf8 } from 'node:buffer'
import { sendable } from '../http/ws-close.js'

export const OPCODE = { continuation: 0x0, text: 0x1, binary: 0x2, close: 0x8, ping: 0x9, pong: 0xa } as const

/** Close codes of protocol violations (RFC 6455 §7.4.1). */
export const VIOLATION = { protocol: 1002, invalidData: 1007, tooBig: 1009 } as const

const HANDSHAKE_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'
/** Longest header: 2 bytes, a 64-bit length, a mask key. */
const MAX_HEADER = 14
/** ws refuses 64-bit lengths over 2^53 - 1: the high word must fit in 21 bits. */
const MAX_HIGH_WORD = 2 ** 21 - 1
const EMPTY = Buffer.alloc(0)

/** Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2). */
export function acceptKey (key: string): string {
  return createHash('sha1').update(key + HANDSHAKE_GUID).digest('base64')
}

/** One final frame; masked (a fresh random key) as a client sends it, unmasked as a server does. */
export function frame (opcode: number, payload: Buffer, masked: boolean): Buffer {
  const len = payload.length
  const ext = len < 126 ? 0 : len < 65_536 ? 2 : 8
  const head = 2 + ext + (masked ? 4 : 0)
  const out = Buffer.allocUnsafe(head + len)
  out[0] = 0x80 | opcode
  out[1] = (masked ? 0x80 : 0) | (ext === 0 ? len : ext === 2 ? 126 : 127)
  if (ext === 2) out.writeUInt16BE(len, 2)
  if (ext === 8) {
    out.writeUInt32BE(Math.floor(len / 2 ** 32), 2)
    out.writeUInt32BE(len >>> 0, 6)
  }
  if (!masked) {
    payload.copy(out, head)
    return out
  }
  const key = randomBytes(4)
  key.copy(out, head - 4)
  for (let i = 0; i < len; i++) out[head + i] = (payload[i] as number) ^ (key[i & 3] as number)
  return out
}

/** A close frame with `code` and `reason` (reason cut to the 123 bytes a control frame allows), or none. */
export function closeFrame (code: number | undefined, reason: string, masked: boolean): Buffer {
  if (code === undefined) return frame(OPCODE.close, EMPTY, masked)
  const text = Buffer.from(reason).subarray(0, 123)
  const payload = Buffer.allocUnsafe(2 + text.length)
  payload.writeUInt16BE(code, 0)
  text.copy(payload, 2)
  return frame(OPCODE.close, payload, masked)
}

/** An unmasked ping with no payload (the gateway's liveness check of a client). */
export const PING_FRAME = frame(OPCODE.ping, EMPTY, false)

/** What the client-side reader reports to its relay. `O` is whatever the relay uses to mark a message's bytes. */
export interface ClientFrameSink<O> {
  /** A data message starts (its first frame's header is complete): returns the mark for its bytes. */
  messageStart (): O
  /** Bytes [from, to) of `chunk`, part of the current message (`mark`) or of a control frame (null). */
  bytes (chunk: Buffer, from: number, to: number, mark: O | null): void
  /** A pong arrived (it is passed on like any control frame). */
  pong (): void
  /** A valid close frame arrived: `bytes` is the whole frame; the reader reads nothing after it. */
  closed (bytes: Buffer, code: number | undefined): void
  /** A protocol violation: the client is owed a close with `code`; the reader reads nothing after it. */
  violation (code: number, why: string): void
}

/** Where the bytes of a partial header are kept until the rest arrives. */
class HeaderBytes {
  readonly buf = Buffer.allocUnsafe(MAX_HEADER)
  length = 0
}

/**
 * Header bytes that may arrive split across chunks. locate() points `src`,
 * `off` and `available` at the header starting at chunk[at]: the chunk
 * itself, or (when the header began in an earlier chunk) the carried-over
 * bytes completed from the chunk in their own small buffer.
 */
abstract class SplitHeaders {
  protected partial: HeaderBytes | undefined = undefined
  protected src: Buffer = EMPTY
  protected off = 0
  protected available = 0

  /** Points src/off/available at the header; returns how many of its bytes were carried over. */
  protected locate (chunk: Buffer, at: number): number {
    const partial = this.partial
    this.available = chunk.length - at
    if (partial === undefined) {
      this.src = chunk
      this.off = at
      return 0
    }
    const carried = partial.length
    this.available = carried + chunk.copy(partial.buf, carried, at, at + Math.min(MAX_HEADER - carried, this.available))
    this.src = partial.buf
    this.off = 0
    return carried
  }

  /** Keeps the start of a header that the chunk ends inside of (all of the chunk from `at`): -1. */
  protected keep (chunk: Buffer, at: number): -1 {
    if (this.partial === undefined) {
      this.partial = new HeaderBytes()
      chunk.copy(this.partial.buf, 0, at)
    }
    this.partial.length = this.available
    return -1
  }
}

/**
 * Client-to-app frames, parsed as they stream by. Each header is checked as
 * soon as the bytes a check needs have arrived, as `ws` does, so a violation
 * gets the same close code at the same point of a stream.
 */
export class ClientFrameReader<O> extends SplitHeaders {
  /** Payload bytes still to come in the current frame. */
  private remaining = 0
  /** The current frame is a data frame's (marked with `mark`), a passed-on control frame's, or a close being read. */
  private mark: O | null = null
  private opcode = 0
  private fin = false
  /** Opcode of the fragmented message in progress, 0 when none. */
  private fragmented = 0
  /** Payload bytes of the current message so far (the size cap counts whole messages). */
  private messageBytes = 0
  /** The close frame being read (header and payload), and how much of it has arrived. */
  private close: Buffer | undefined = undefined
  private closeLength = 0
  private stopped = false

  constructor (private readonly maxPayload: number, private readonly sink: ClientFrameSink<O>) { super() }

  /** Nothing more is read (a close frame, a violation, or the session ended). */
  stop (): void { this.stopped = true }

  /**
   * Inside the payload of a frame whose header was passed on: bytes written
   * after this point would cut that frame. A partial header, a close frame
   * being read and a frame boundary all count as outside.
   */
  get inPassedFrame (): boolean { return this.remaining > 0 && this.close === undefined }

  /** The mark of the frame in progress (null: a control frame or none). */
  get current (): O | null { return this.mark }

  feed (chunk: Buffer): void {
    const end = chunk.length
    let i = 0
    let regionStart = 0 // bytes of this chunk from here on belong to `mark` and are not handed over yet
    while (i < end && !this.stopped) {
      if (this.remaining > 0) {
        const take = Math.min(this.remaining, end - i)
        if (this.close !== undefined) {
          chunk.copy(this.close, this.closeLength, i, i + take)
          this.closeLength += take
          regionStart = i + take
        }
        i += take
        this.remaining -= take
        if (this.remaining === 0) this.frameEnd()
        continue
      }
      // a header starts at i (or continues from earlier chunks): hand over what the previous frame left
      if (regionStart < i) this.sink.bytes(chunk, regionStart, i, this.mark)
      const used = this.header(chunk, i)
      if (used < 0) return // partial header kept, or stopped
      if (this.close !== undefined) regionStart = i + used
      else regionStart = i
      i += used
      if (this.remaining === 0) this.frameEnd()
    }
    if (regionStart < i && !this.stopped) this.sink.bytes(chunk, regionStart, i, this.mark)
  }

  /**
   * Parses the header starting at chunk[at] (after any carried-over bytes):
   * the number of chunk bytes it used, or -1 when it is incomplete (kept for
   * the next chunk) or violates the protocol (reported; reading stops).
   */
  private header (chunk: Buffer, at: number): number {
    const carried = this.locate(chunk, at)
    const { src, off, available } = this
    const size = this.headerSize(src, off, available)
    if (size === 0) return -1 // violation, reported
    if (size > available) return this.keep(chunk, at)
    const b0 = src[off] as number
    const used = size - carried
    this.begin(b0 & 0x0f, (b0 & 0x80) !== 0, this.length)
    if (this.close !== undefined) {
      if (carried > 0) (this.partial as HeaderBytes).buf.copy(this.close, 0, 0, carried)
      chunk.copy(this.close, carried, at, at + used)
      this.closeLength = size
    } else if (carried > 0) {
      // the carried-over part of the header goes out ahead of the rest of the frame
      this.sink.bytes((this.partial as HeaderBytes).buf, 0, carried, this.mark)
    }
    this.partial = undefined
    return used
  }

  /** Payload length of the header being parsed (set by headerSize). */
  private length = 0

  /**
   * The size of the header at src[off] (2 to 14 bytes) once enough of it is
   * there to know; a size over `available` means: wait for more. 0 after a
   * violation (reported). Checks run as soon as their bytes are there.
   */
  private headerSize (src: Buffer, off: number, available: number): number {
    if (available < 2) return 2
    const b0 = src[off] as number
    const b1 = src[off + 1] as number
    const problem = this.firstTwo(b0, b1)
    if (problem !== undefined) return this.violate(VIOLATION.protocol, problem)
    const len7 = b1 & 0x7f
    const ext = len7 === 126 ? 2 : len7 === 127 ? 8 : 0
    if (available < 2 + ext) return 2 + ext
    let length = len7
    if (ext === 2) length = src.readUInt16BE(off + 2)
    if (ext === 8) {
      const high = src.readUInt32BE(off + 2)
      if (high > MAX_HIGH_WORD) return this.violate(VIOLATION.tooBig, 'payload length over 2^53 - 1')
      length = high * 2 ** 32 + src.readUInt32BE(off + 6)
    }
    const opcode = b0 & 0x0f
    if (opcode < OPCODE.close && length > 0 && (opcode === OPCODE.continuation ? this.messageBytes : 0) + length > this.maxPayload) {
      return this.violate(VIOLATION.tooBig, 'message over the size cap')
    }
    this.length = length
    return 2 + ext + 4
  }

  /** The checks ws makes on a header's first two bytes (RSV bits, opcode, fragmentation, control frames, mask). */
  private firstTwo (b0: number, b1: number): string | undefined {
    if ((b0 & 0x30) !== 0) return 'RSV2 and RSV3 must be clear'
    if ((b0 & 0x40) !== 0) return 'RSV1 must be clear'
    const opcode = b0 & 0x0f
    const fin = (b0 & 0x80) !== 0
    const len7 = b1 & 0x7f
    if (opcode === OPCODE.continuation) {
      if (this.fragmented === 0) return 'invalid opcode 0'
    } else if (opcode === OPCODE.text || opcode === OPCODE.binary) {
      if (this.fragmented !== 0) return `invalid opcode ${opcode}`
    } else if (opcode >= OPCODE.close && opcode <= OPCODE.pong) {
      if (!fin) return 'FIN must be set'
      if (len7 > 125 || (opcode === OPCODE.close && len7 === 1)) return `invalid payload length ${len7}`
    } else {
      return `invalid opcode ${opcode}`
    }
    if ((b1 & 0x80) === 0) return 'MASK must be set'
    return undefined
  }

  /** A complete, valid header: the frame's state, and for a new data message its mark. */
  private begin (opcode: number, fin: boolean, length: number): void {
    this.opcode = opcode
    this.fin = fin
    this.remaining = length
    if (opcode >= OPCODE.close) {
      this.mark = null
      if (opcode === OPCODE.close) this.close = Buffer.allocUnsafe(6 + length)
      if (opcode === OPCODE.pong) this.sink.pong()
      return
    }
    if (opcode === OPCODE.continuation) {
      this.messageBytes += length
      return
    }
    this.messageBytes = length
    if (!fin) this.fragmented = opcode
    this.mark = this.sink.messageStart()
  }

  private frameEnd (): void {
    if (this.close !== undefined) { this.closeEnd(this.close); return }
    if (this.opcode < OPCODE.close && this.fin) {
      this.fragmented = 0
      this.messageBytes = 0
    }
  }

  /** A complete close frame: code and reason checked as ws does, then handed over whole. */
  private closeEnd (bytes: Buffer): void {
    this.close = undefined
    this.stopped = true
    const at = bytes.length - ((bytes[1] as number) & 0x7f) // a close payload fits the 7-bit length
    const payload = Buffer.allocUnsafe(bytes.length - at)
    for (let k = 0; k < payload.length; k++) payload[k] = (bytes[at + k] as number) ^ (bytes[at - 4 + (k & 3)] as number)
    if (payload.length === 0) { this.sink.closed(bytes, undefined); return }
    const code = payload.readUInt16BE(0)
    if (!sendable(code)) { this.sink.violation(VIOLATION.protocol, `invalid status code ${code}`); return }
    if (!isUtf8(payload.subarray(2))) { this.sink.violation(VIOLATION.invalidData, 'invalid UTF-8 in the close reason'); return }
    this.sink.closed(bytes, code)
  }

  private violate (code: number, why: string): 0 {
    this.stopped = true
    this.sink.violation(code, why)
    return 0
  }
}

/** Where an app-to-client scan stops before the chunk's end. */
export type ScanStop = 'boundary' | 'close' | 'too_big' | undefined

/** Boundaries a scan may stop at: none, any frame's end, a message's end. */
export const UNTIL = { none: 0, frame: 1, message: 2 } as const
export type Until = typeof UNTIL[keyof typeof UNTIL]

/**
 * App-to-client frames: lengths only, so the relay knows where frames and
 * messages end. scan() walks a chunk and stops early only where the relay has
 * to act: at the boundary it waits for, after the app's close frame, or at
 * the header of a message over the size cap.
 */
export class AppFrameScanner extends SplitHeaders {
  /** Why the last scan() stopped before the chunk's end. */
  stop: ScanStop = undefined
  /** Complete data messages seen so far. */
  messages = 0
  /** Data frames whose header has been seen (activity). */
  dataFrames = 0
  private remaining = 0
  private opcode = 0
  private fin = false
  private inMessage = false
  private messageBytes = 0

  constructor (private readonly maxPayload: number) { super() }

  /** Between frames (no header or payload in progress). */
  get atFrameBoundary (): boolean { return this.remaining === 0 && this.partial === undefined }

  /** Between frames and outside any fragmented message. */
  get atMessageBoundary (): boolean { return this.atFrameBoundary && !this.inMessage }

  /** Scans chunk[from..]; returns where it stopped (chunk.length, or earlier with `stop` set). */
  scan (chunk: Buffer, from: number, until: Until): number {
    this.stop = undefined
    const end = chunk.length
    let i = from
    while (i < end) {
      if (this.remaining > 0) {
        const take = Math.min(this.remaining, end - i)
        i += take
        this.remaining -= take
        if (this.remaining === 0 && this.frameEnd(until)) return i
        continue
      }
      const used = this.header(chunk, i)
      if (used < 0) return this.stop === 'too_big' ? i : end
      i += used
      if (this.remaining === 0 && this.frameEnd(until)) return i
    }
    return end
  }

  /** A frame ended: true when the scan stops here. */
  private frameEnd (until: Until): boolean {
    if (this.opcode < OPCODE.close && this.fin) {
      this.messages++
      this.inMessage = false
      this.messageBytes = 0
    }
    if (this.opcode === OPCODE.close) { this.stop = 'close'; return true }
    if (until === UNTIL.frame || (until === UNTIL.message && !this.inMessage)) { this.stop = 'boundary'; return true }
    return false
  }

  /** Parses a header at chunk[at] (continuing carried-over bytes): chunk bytes used, or -1 (kept, or too big). */
  private header (chunk: Buffer, at: number): number {
    const carried = this.locate(chunk, at)
    const { src, off, available } = this
    const size = available < 2 ? 2 : headerSizeOf(src[off + 1] as number)
    if (size > available) return this.keep(chunk, at)
    const b0 = src[off] as number
    const len7 = (src[off + 1] as number) & 0x7f
    const length = len7 < 126 ? len7 : len7 === 126 ? src.readUInt16BE(off + 2) : src.readUInt32BE(off + 2) * 2 ** 32 + src.readUInt32BE(off + 6)
    const opcode = b0 & 0x0f
    if (opcode < OPCODE.close) {
      this.dataFrames++
      const total = (opcode === OPCODE.continuation ? this.messageBytes : 0) + length
      if (total > this.maxPayload) { this.stop = 'too_big'; return -1 }
      this.messageBytes = total
      this.inMessage = true
    }
    this.opcode = opcode
    this.fin = (b0 & 0x80) !== 0
    this.remaining = length
    this.partial = undefined
    return size - carried
  }
}

/** A header's size from its second byte: the length field's width, plus a mask key when masked. */
function headerSizeOf (b1: number): number {
  const len7 = b1 & 0x7f
  return 2 + (len7 === 126 ? 2 : len7 === 127 ? 8 : 0) + ((b1 & 0x80) !== 0 ? 4 : 0)
}
