// Loopback ports for tests: a free one to hand to a process, and whether one can be bound (i.e. nobody holds it).
import { createServer, type AddressInfo } from 'node:net'

/**
 * Below Linux's default ephemeral range (32768-60999): a port from there is
 * never handed out by the kernel to a listen(0) or an outgoing connection, so
 * a process that listens on port 0 (an app, an issuer) cannot take the port
 * between our check and the child's bind. Seen: the demo's app got the very
 * port just picked for its gateway (EADDRINUSE) while the machine was busy.
 */
const FIXED_RANGE = { from: 20_000, to: 32_767 }

/** A port nobody listens on right now, outside the ephemeral range (see FIXED_RANGE); bind 0 as the last resort. */
export async function freePort (): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = FIXED_RANGE.from + Math.floor(Math.random() * (FIXED_RANGE.to - FIXED_RANGE.from + 1))
    if (await canBind(port)) return port
  }
  const s = createServer()
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve))
  const port = (s.address() as AddressInfo).port
  await new Promise((resolve) => s.close(resolve))
  return port
}

/** True when `port` on 127.0.0.1 can be bound now (nothing left holding it). */
export async function canBind (port: number): Promise<boolean> {
  const s = createServer()
  return await new Promise((resolve) => {
    s.once('error', () => resolve(false))
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)))
  })
}
