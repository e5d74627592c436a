/**
 * What a component reports about its own health: the readiness endpoint
 * (admin/readiness.ts) collects these. Kept apart from the admin listener so
 * components (keys, revocations, the Redis store) report without depending on it.
 */
export interface CheckResult { ok: boolean, detail?: string | undefined }
export type Check = () => CheckResult | Promise<CheckResult>
