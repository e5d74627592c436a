/**
 * Durations in config: a bare number is milliseconds; a string may carry a unit.
 *   60000 | "60000" | "60s" | "1m" | "1.5h" | "250ms" -> milliseconds
 * Pure and table-tested; returns undefined for anything it cannot read so the
 * loader can report the field.
 */
const UNIT_MS: Record<string, number> = {
  ms: 1,
  s: 1_000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000
}

const DURATION_RE = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$/

export function parseDuration (value: unknown): number | undefined {
  if (typeof value === 'number') {
    return Number.isFinite(value) && value >= 0 ? Math.round(value) : undefined
  }
  if (typeof value !== 'string') return undefined
  const match = DURATION_RE.exec(value.trim().toLowerCase())
  if (match === null) return undefined
  const amount = Number(match[1])
  const unit = UNIT_MS[match[2] ?? 'ms'] as number
  const ms = Math.round(amount * unit)
  return Number.isSafeInteger(ms) ? ms : undefined
}
