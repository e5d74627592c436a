// Loopback ports for tests: a free one to hand to a process, and whether one can be bound (i.e. nobody holds it).
import { createServer, type AddressInfo } from 'node:net'

/** A port nobody listens on right now: bind 0, read it, close. */
export async function freePort (): Promise<number> {
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
