/**
 * Readiness = every registered check passes (oauth2-proxy's Verifiable idea).
 * /healthz never calls these: liveness must not depend on Keycloak or Redis.
 */
import type { Check, CheckResult } from '../observability/health.js'

export type { Check, CheckResult }

export class Readiness {
  private readonly checks = new Map<string, Check>()
  draining = false

  add (name: string, check: Check): void {
    this.checks.set(name, check)
  }

  async evaluate (): Promise<{ ready: boolean, checks: Record<string, CheckResult> }> {
    const checks: Record<string, CheckResult> = {
      draining: this.draining ? { ok: false, detail: 'shutting down' } : { ok: true }
    }
    await Promise.all([...this.checks].map(async ([name, check]) => {
      try {
        checks[name] = await check()
      } catch (err) {
        checks[name] = { ok: false, detail: (err as Error).message }
      }
    }))
    return { ready: Object.values(checks).every((c) => c.ok), checks }
  }
}
