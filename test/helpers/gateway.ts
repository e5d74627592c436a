// The gateway under test, built from the same code as `npm start` (buildGateway), listening on ephemeral loopback
// ports, with every log line captured for assertions (audit lines, token-leak grep).
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import type { AddressInfo } from 'node:net'
import { buildGateway, type Gateway } from '../../src/app.js'
import { loadConfig } from '../../src/config/load.js'
import type { TestIssuer } from './issuer.js'
import type { TestUpstream } from './upstream.js'

export interface LogLine { level: number, msg: string, [k: string]: unknown }

export interface TestGateway {
  gw: Gateway
  url: string
  wsUrl: string
  adminUrl: string
  /** Every raw line the gateway logged so far (diagnostic log and audit trail). */
  rawLogs: string[]
  /** The raw lines of the audit trail only (GatewayDeps.auditStream); empty when the env sets AUDIT_LOG. */
  rawAudits: string[]
  logs (): LogLine[]
  audits (): LogLine[]
  close (): Promise<void>
}

export interface GatewayOptions {
  env?: Record<string, string>
  yaml?: string
  /** Skip waiting for the JWKS to load. */
  noStart?: boolean
}

interface Teardown { teardown (fn: () => unknown): void }

export function writeYaml (yaml: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'gw-config-'))
  const file = join(dir, 'gateway.yaml')
  writeFileSync(file, yaml)
  return file
}

export function baseEnv (issuer: TestIssuer, upstream: TestUpstream): Record<string, string> {
  return {
    JWT_ISSUER: issuer.issuer,
    JWT_AUDIENCE: issuer.audience,
    UPSTREAM_URL: upstream.url,
    HOST: '127.0.0.1',
    PORT: '0',
    ADMIN_HOST: '127.0.0.1',
    ADMIN_PORT: '0',
    ALLOW_INSECURE_HTTP: 'true',
    LOG_LEVEL: 'info'
  }
}

export async function startGateway (t: Teardown, issuer: TestIssuer, upstream: TestUpstream, opts: GatewayOptions = {}): Promise<TestGateway> {
  const env = { ...baseEnv(issuer, upstream), CONFIG_FILE: writeYaml(opts.yaml ?? ''), ...opts.env }
  const config = loadConfig({ env })
  const rawLogs: string[] = []
  const logStream = new Writable({
    write (chunk, _enc, cb) {
      for (const line of String(chunk).split('\n')) if (line !== '') rawLogs.push(line)
      cb()
    }
  })
  // The audit trail has its own stream: captured here too (into rawLogs as well), unless the test chose AUDIT_LOG.
  const rawAudits: string[] = []
  const auditStream = new Writable({
    write (chunk, _enc, cb) {
      for (const line of String(chunk).split('\n')) {
        if (line !== '') { rawAudits.push(line); rawLogs.push(line) }
      }
      cb()
    }
  })
  const gw = await buildGateway(config, { logStream, env, ...((env as Record<string, string>).AUDIT_LOG === undefined ? { auditStream } : {}) })
  if (opts.noStart !== true) await gw.start()
  await gw.app.listen({ host: '127.0.0.1', port: 0 })
  await gw.admin.listen({ host: '127.0.0.1', port: 0 })
  const port = (gw.app.server.address() as AddressInfo).port
  const adminPort = (gw.admin.server.address() as AddressInfo).port
  let closed = false
  const close = async (): Promise<void> => {
    if (closed) return
    closed = true
    await gw.close()
  }
  t.teardown(close)
  const logs = (): LogLine[] => rawLogs.map((l) => JSON.parse(l) as LogLine)
  return {
    gw,
    url: `http://127.0.0.1:${port}`,
    wsUrl: `ws://127.0.0.1:${port}`,
    adminUrl: `http://127.0.0.1:${adminPort}`,
    rawLogs,
    rawAudits,
    logs,
    audits: () => logs().filter((l) => l.component === 'audit'),
    close
  }
}
