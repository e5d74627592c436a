// The gateway under test, built from the same code as `npm start` (buildGateway), listening on ephemeral loopback
// ports, with every log line captured for assertions (audit lines, token-leak grep); the issuer and app it stands
// between (startBackends), and the requests every test makes of it (/readyz, an authenticated GET).
import { execFileSync } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, writeFileSync } from 'node:fs'
import http from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import type { AddressInfo } from 'node:net'
import { buildGateway, type Gateway } from '../../src/app.js'
import { loadConfig } from '../../src/config/load.js'
import { startIssuer, type TestIssuer } from './issuer.js'
import { startUpstream, type TestUpstream } from './upstream.js'
import { until } from './wait.js'

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

/** A real issuer and a recording app, both closed when `t` ends (for a whole file: pass the root `t`). */
export async function startBackends (t: Teardown): Promise<{ issuer: TestIssuer, upstream: TestUpstream }> {
  const issuer = await startIssuer()
  t.teardown(() => issuer.close())
  const upstream = await startUpstream()
  t.teardown(() => upstream.close())
  return { issuer, upstream }
}

export function writeYaml (yaml: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'gw-config-'))
  const file = join(dir, 'gateway.yaml')
  writeFileSync(file, yaml)
  return file
}

/** A throwaway self-signed certificate for 127.0.0.1 (TLS_CERT, TLS_KEY), generated per call (never committed). */
export function selfSignedCert (): { cert: string, key: string } {
  const dir = mkdtempSync(join(tmpdir(), 'gw-tls-'))
  const cert = join(dir, 'cert.pem')
  const key = join(dir, 'key.pem')
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1',
    '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', key, '-out', cert], { stdio: 'ignore' })
  return { cert, key }
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

export interface Check { ok: boolean, detail?: string }
export interface Readyz { status: number, body: { status: string, checks: Record<string, Check> } }

/** GET /readyz of an admin listener (a TestGateway, or a spawned gateway process). */
export async function readyz (g: { adminUrl: string }, timeoutMs = 5000): Promise<Readyz> {
  const res = await fetch(`${g.adminUrl}/readyz`, { signal: AbortSignal.timeout(timeoutMs) })
  return { status: res.status, body: await res.json() as Readyz['body'] }
}

/** Waits until /readyz answers 200 (keys loaded; Redis and revocations ready when configured); no answer yet counts as not ready. */
export async function untilReady (g: { adminUrl: string }, ms = 5000, what = 'gateway ready'): Promise<void> {
  await until(async () => (await readyz(g).catch(() => undefined))?.status === 200, ms, what, 25)
}

export interface Answer { status: number, headers: Headers, body: string }

/** GET `path` (by default a fresh /api/<uuid>) through the gateway with `token` as bearer; the whole body read. */
export async function getAs (g: { url: string }, token: string, path = `/api/${randomUUID()}`): Promise<Answer> {
  const res = await fetch(`${g.url}${path}`, { headers: { authorization: `Bearer ${token}` }, signal: AbortSignal.timeout(5000) })
  return { status: res.status, headers: res.headers, body: await res.text() }
}

export interface VerbatimAnswer { status: number, headers: Record<string, string | undefined>, body: string }

/**
 * One request on a fresh connection with the target sent verbatim (node:http; fetch would resolve dot segments and
 * normalise the target before sending); repeated response headers joined with ", ".
 */
export function sendVerbatim (base: string, method: string, path: string, headers: Record<string, string> = {}): Promise<VerbatimAnswer> {
  const { hostname, port } = new URL(base)
  return new Promise((resolve, reject) => {
    const req = http.request({ host: hostname, port, method, path, headers, agent: false }, (res) => {
      const chunks: Buffer[] = []
      res.on('data', (c: Buffer) => chunks.push(c))
      res.on('end', () => {
        const h: Record<string, string | undefined> = {}
        for (const [k, v] of Object.entries(res.headers)) h[k] = Array.isArray(v) ? v.join(', ') : v
        resolve({ status: res.statusCode ?? 0, headers: h, body: Buffer.concat(chunks).toString('utf8') })
      })
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end()
  })
}
