// WebSocket frames on the wire (RFC 6455 §5.2), for tests that speak the protocol themselves over a raw socket:
// building any frame a client might send, valid or not (any opcode, RSV bits, masked or not, FIN or not, any length
// encoding, a length field that lies), the client's half of the opening handshake, and a streaming reader of the
// frames a server sends back (any chunking; masked frames are unmasked).
import { createHash, randomBytes } from 'node:crypto'

export const OP = { continuation: 0x0, text: 0x1, binary: 0x2, close: 0x8, ping: 0x9, pong: 0xa } as const

/** RSV bits as they sit in the first byte's upper nibble below FIN: RSV1 0x4, RSV2 0x2, RSV3 0x1. */
export const RSV = { rsv1: 0x4, rsv2: 0x2, rsv3: 0x1 } as const

/** How the payload length is written: the shortest form (7, 7+16 or 7+64 bits), or forced to 7+16 or 7+64 bits. */
export type LengthEncoding = 'minimal' | '16' | '64'

export interface FrameSpec {
  opcode: number
  /** Default true. */
  fin?: boolean
  /** 0..7, see RSV. Default 0. */
  rsv?: number
  payload?: Uint8Array
  /** A 4-byte masking key, or false for an unmasked frame. Default: a random key. */
  mask?: Uint8Array | false
  /** Default 'minimal'. */
  length?: LengthEncoding
  /** Written in the length field instead of the payload's real length (the payload bytes are sent as given). */
  declaredLength?: bigint
}

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'

/** The bytes of one frame. Throws when the requested length encoding cannot hold the length. */
export function frame (spec: FrameSpec): Buffer {
  const payload = Buffer.from(spec.payload ?? new Uint8Array(0))
  const len = spec.declaredLength ?? BigInt(payload.length)
  const encoding = spec.length ?? 'minimal'
  const mask = spec.mask === false ? undefined : Buffer.from(spec.mask ?? randomBytes(4))
  if (mask !== undefined && mask.length !== 4) throw new RangeError('a masking key has 4 bytes')
  if (len < 0n || len >= 1n << 64n) throw new RangeError(`length ${len} does not fit 64 bits`)
  const rsv = spec.rsv ?? 0
  const b0 = ((spec.fin ?? true) ? 0x80 : 0) | ((rsv & 0x7) << 4) | (spec.opcode & 0xf)
  const maskBit = mask !== undefined ? 0x80 : 0
  let header: Buffer
  if (encoding === 'minimal' && len < 126n) {
    header = Buffer.from([b0, maskBit | Number(len)])
  } else if (encoding === '16' || (encoding === 'minimal' && len < 65536n)) {
    if (len >= 65536n) throw new RangeError(`length ${len} does not fit 16 bits`)
    header = Buffer.alloc(4)
    header[0] = b0
    header[1] = maskBit | 126
    header.writeUInt16BE(Number(len), 2)
  } else {
    header = Buffer.alloc(10)
    header[0] = b0
    header[1] = maskBit | 127
    header.writeBigUInt64BE(len, 2)
  }
  if (mask === undefined) return Buffer.concat([header, payload])
  const masked = Buffer.alloc(payload.length)
  for (let i = 0; i < payload.length; i++) masked[i] = (payload[i] ?? 0) ^ (mask[i & 3] ?? 0)
  return Buffer.concat([header, mask, masked])
}

/** The payload of a close frame: nothing, a code, or a code and a reason (any bytes). */
export function closePayload (code?: number, reason: Uint8Array = new Uint8Array(0)): Buffer {
  if (code === undefined) return Buffer.alloc(0)
  const b = Buffer.alloc(2)
  b.writeUInt16BE(code & 0xffff)
  return Buffer.concat([b, reason])
}

/** A Sec-WebSocket-Key: 16 random bytes in base64. */
export function handshakeKey (): string {
  return randomBytes(16).toString('base64')
}

/** The Sec-WebSocket-Accept a server must answer for `key`. */
export function acceptFor (key: string): string {
  return createHash('sha1').update(key + GUID).digest('base64')
}

/** The client's opening handshake (HTTP/1.1 GET with Upgrade), extra header lines as given. */
export function upgradeRequest (host: string, path: string, key: string, headers: Record<string, string> = {}): string {
  const lines = [
    `GET ${path} HTTP/1.1`,
    `Host: ${host}`,
    'Upgrade: websocket',
    'Connection: Upgrade',
    `Sec-WebSocket-Key: ${key}`,
    'Sec-WebSocket-Version: 13',
    ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`)
  ]
  return `${lines.join('\r\n')}\r\n\r\n`
}

export interface ParsedFrame {
  fin: boolean
  rsv: number
  opcode: number
  masked: boolean
  /** Unmasked. */
  payload: Buffer
}

/** Frames out of a byte stream fed in any chunking; bytes of an incomplete frame wait for the next push. */
export class FrameReader {
  private buf = Buffer.alloc(0)
  readonly frames: ParsedFrame[] = []

  /** Feeds bytes; returns the frames completed by them (also appended to `frames`). */
  push (chunk: Uint8Array): ParsedFrame[] {
    this.buf = this.buf.length === 0 ? Buffer.from(chunk) : Buffer.concat([this.buf, chunk])
    const out: ParsedFrame[] = []
    for (;;) {
      const f = this.next()
      if (f === undefined) break
      out.push(f)
      this.frames.push(f)
    }
    return out
  }

  /** Bytes received that do not make a whole frame yet. */
  get pending (): number { return this.buf.length }

  private next (): ParsedFrame | undefined {
    const b = this.buf
    if (b.length < 2) return undefined
    const b0 = b[0] ?? 0
    const b1 = b[1] ?? 0
    const masked = (b1 & 0x80) !== 0
    let len = BigInt(b1 & 0x7f)
    let at = 2
    if (len === 126n) {
      if (b.length < 4) return undefined
      len = BigInt(b.readUInt16BE(2))
      at = 4
    } else if (len === 127n) {
      if (b.length < 10) return undefined
      len = b.readBigUInt64BE(2)
      at = 10
    }
    const maskAt = at
    if (masked) at += 4
    if (BigInt(b.length - at) < len) return undefined
    const end = at + Number(len)
    const payload = Buffer.from(b.subarray(at, end))
    if (masked) for (let i = 0; i < payload.length; i++) payload[i] = (payload[i] ?? 0) ^ (b[maskAt + (i & 3)] ?? 0)
    this.buf = b.subarray(end)
    return { fin: (b0 & 0x80) !== 0, rsv: (b0 >> 4) & 0x7, opcode: b0 & 0xf, masked, payload }
  }
}

/** Code and reason of a close frame's payload; code 1005 ("no status") when it has none. */
export function parseClose (payload: Buffer): { code: number, reason: Buffer } {
  if (payload.length < 2) return { code: 1005, reason: Buffer.alloc(0) }
  return { code: payload.readUInt16BE(0), reason: payload.subarray(2) }
}
