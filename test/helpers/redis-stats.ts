// What a Redis server counted per command (`INFO commandstats`), for tests that prove which commands a client sent
// (EVALSHA or EVAL, how many, refused or not). Measure on a private redis-server so parallel test files cannot disturb
// the counts.
import type { Redis } from 'ioredis'

export interface CmdStat { calls: number, rejected: number, failed: number }

/** `INFO commandstats` as { evalsha: {calls, rejected, failed}, ... }. */
export async function commandStats (c: Redis): Promise<Record<string, CmdStat>> {
  const text = await c.info('commandstats')
  const out: Record<string, CmdStat> = {}
  for (const line of text.split('\r\n')) {
    const m = /^cmdstat_([^:]+):(.*)$/.exec(line)
    if (m === null) continue
    const fields = Object.fromEntries((m[2] ?? '').split(',').map((kv) => kv.split('=') as [string, string]))
    out[m[1] ?? ''] = { calls: Number(fields.calls ?? 0), rejected: Number(fields.rejected_calls ?? 0), failed: Number(fields.failed_calls ?? 0) }
  }
  return out
}

/** Per-command deltas between two commandstats snapshots. */
export function delta (before: Record<string, CmdStat>, after: Record<string, CmdStat>, cmd: string): CmdStat {
  const b = before[cmd] ?? { calls: 0, rejected: 0, failed: 0 }
  const a = after[cmd] ?? { calls: 0, rejected: 0, failed: 0 }
  return { calls: a.calls - b.calls, rejected: a.rejected - b.rejected, failed: a.failed - b.failed }
}

/** Every attempt of a script command: executed calls plus those rejected before execution. */
export const attempts = (d: CmdStat): number => d.calls + d.rejected
