/**
 * The README's configuration table, generated from the settings table
 * (settings.ts): `node scripts/config-table.mjs` prints it, and a test checks
 * that README.md holds exactly this text, so the reference cannot drift.
 */
import { CONFIG_FILE, LEAVES, type Leaf } from './settings.js'

const HEADER = [
  '| YAML key | Env | Default | Reload | Meaning |',
  '|---|---|---|---|---|',
  `| – | \`${CONFIG_FILE.env}\` | \`${CONFIG_FILE.default}\` | ${CONFIG_FILE.reload} | ${CONFIG_FILE.doc} |`
]

function defaultText (leaf: Leaf<unknown>): string {
  if (leaf.required === true) return '**required**'
  const d = leaf.default
  if (d === undefined) return 'unset'
  if (Array.isArray(d)) return d.length > 0 ? d.join(',') : '(empty)'
  return (leaf.parse as { unit?: string }).unit === 'ms' ? `${String(d)} ms` : String(d)
}

export function configTable (): string {
  const rows = [...HEADER]
  for (const [path, leaf] of Object.entries(LEAVES) as Array<[string, Leaf<unknown>]>) {
    rows.push(`| \`${path}\` | \`${leaf.env}\` | ${defaultText(leaf)} | ${leaf.reload} | ${leaf.doc.replace(/\|/g, '\\|')} |`)
  }
  return rows.join('\n')
}
