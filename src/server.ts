/**
 * Entrypoint: loadConfig() -> buildGateway() -> listen public + admin (with
 * WARMUP > 0 the warm-up, warmup/, runs meanwhile and holds /readyz at 503
 * until it has ended) -> graceful shutdown. Invalid configuration exits 1 before binding any port.
 *
 * SIGTERM/SIGINT: /readyz turns 503 at once, the public port keeps serving for
 * SHUTDOWN_DELAY (load balancers notice and drain), then WebSockets get 1001,
 * the listener closes and in-flight requests finish; SHUTDOWN_TIMEOUT bounds it
 * all. A second signal exits at once.
 */
import { loadConfig, type Config } from './config/load.js'
import { buildGateway } from './app.js'
import { warmUpBeforeReady } from './warmup/index.js'

export async function main (env: NodeJS.ProcessEnv = process.env): Promise<void> {
  let config: Config
  try {
    config = loadConfig({ env })
  } catch (err) {
    process.stderr.write(`resonance-gateway: ${(err as Error).message}\n`)
    process.exit(1)
  }

  const gw = await buildGateway(config)
  const log = gw.app.log
  gw.start().catch(() => {}) // failures are logged and shown by /readyz; requests answer meanwhile
  // WARMUP (a no-op when 0): its readiness check is in place before the admin listener answers; it never rejects.
  warmUpBeforeReady(gw).catch(() => {})
  await gw.app.listen({ host: config.server.host, port: config.server.port })
  await gw.admin.listen({ host: config.admin.host, port: config.admin.port })
  log.info({
    public: gw.app.addresses(),
    admin: gw.admin.addresses(),
    upstream: config.upstream.url,
    issuer: config.auth.issuer,
    tls: config.server.tls !== undefined,
    config: config.source ?? '(defaults and environment)'
  }, 'gateway listening')

  // Audit lines are written synchronously; flushing before every exit also covers a stream that buffers.
  const exit = (code: number): never => {
    gw.audit.flush()
    return process.exit(code)
  }
  let stopping = false
  const stop = (signal: string): void => {
    if (stopping) {
      log.warn({ signal }, 'second signal: exiting now')
      exit(1)
    }
    stopping = true
    log.info({ signal, delayMs: config.server.shutdownDelayMs }, 'shutting down: readiness failed, draining')
    gw.readiness.draining = true
    const force = setTimeout(() => {
      log.error({ timeoutMs: config.server.shutdownTimeoutMs }, 'shutdown timed out: exiting')
      exit(1)
    }, config.server.shutdownTimeoutMs)
    force.unref()
    setTimeout(() => {
      gw.close().then(() => {
        log.info('shutdown complete')
        exit(0)
      }, (err: unknown) => {
        log.error({ err }, 'shutdown failed')
        exit(1)
      })
    }, config.server.shutdownDelayMs).unref()
  }
  process.on('SIGHUP', () => {
    log.info({ component: 'config', signal: 'SIGHUP' }, 'reloading configuration')
    gw.reload()
  })
  process.on('SIGTERM', () => stop('SIGTERM'))
  process.on('SIGINT', () => stop('SIGINT'))
}

process.on('uncaughtException', (err) => {
  process.stderr.write(JSON.stringify({ level: 60, time: Date.now(), msg: 'uncaught exception', err: { message: err.message, stack: err.stack } }) + '\n')
  process.exit(1)
})

main().catch((err: Error) => {
  process.stderr.write(`resonance-gateway: failed to start: ${err.message}\n`)
  process.exit(1)
})
