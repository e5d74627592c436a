// A TCP proxy in front of a real server (Redis), for the network faults a test needs: replies held back for a while
// (a slow link), one client's connections cut by what they sent (e.g. only the subscriber connection, whose client
// sent SUBSCRIBE), and new connections held until released (a reconnect that cannot get through).
import { connect, createServer, type AddressInfo, type Socket } from 'node:net'
import type { Teardown } from './redis.js'

export interface TcpProxy {
  /** The proxy's port on 127.0.0.1. */
  port: number
  /** Milliseconds each chunk from the server waits before it is passed on to the client (order kept). 0: none. */
  replyDelayMs: number
  /** Destroys every connection whose client has sent bytes matching `sent`; returns how many. */
  cut (sent: RegExp): number
  /** Holds new connections (accepted, nothing passed on) until release(). */
  hold (): void
  /** Passes the held connections on, and every new one again. */
  release (): void
  close (): Promise<void>
}

interface Link { client: Socket, server: Socket | undefined, sent: string, pending: Buffer[] }

/** A proxy on 127.0.0.1 to `target`, closed when `t` ends. */
export async function tcpProxy (t: Teardown, target: { host: string, port: number }): Promise<TcpProxy> {
  const links = new Set<Link>()
  let held: Link[] | undefined

  function drop (link: Link): void {
    link.client.destroy()
    link.server?.destroy()
    links.delete(link)
  }

  function join (link: Link): void {
    const server = connect(target.port, target.host)
    link.server = server
    for (const chunk of link.pending) server.write(chunk)
    link.pending = []
    server.on('data', (chunk: Buffer) => {
      if (proxy.replyDelayMs <= 0) { link.client.write(chunk); return }
      setTimeout(() => { if (!link.client.destroyed) link.client.write(chunk) }, proxy.replyDelayMs)
    })
    const end = (): void => drop(link)
    server.on('error', end).on('close', end)
    link.client.on('close', end)
  }

  const listener = createServer((client) => {
    const link: Link = { client, server: undefined, sent: '', pending: [] }
    links.add(link)
    client.on('error', () => {})
    client.on('data', (chunk: Buffer) => {
      // What the client sent (the first 4 KiB), to pick connections by.
      if (link.sent.length < 4096) link.sent += chunk.toString('latin1')
      if (link.server !== undefined) link.server.write(chunk)
      else link.pending.push(chunk)
    })
    if (held !== undefined) held.push(link)
    else join(link)
  })
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve))

  const proxy: TcpProxy = {
    port: (listener.address() as AddressInfo).port,
    replyDelayMs: 0,
    cut (sent) {
      let n = 0
      for (const link of links) {
        if (!sent.test(link.sent)) continue
        drop(link)
        n++
      }
      return n
    },
    hold () { held ??= [] },
    release () {
      const waiting = held ?? []
      held = undefined
      for (const link of waiting) if (!link.client.destroyed) join(link)
    },
    async close () {
      for (const link of links) drop(link)
      await new Promise<void>((resolve) => listener.close(() => resolve()))
    }
  }
  t.teardown(async () => await proxy.close())
  return proxy
}
