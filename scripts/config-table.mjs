// Prints the README configuration table from src/config/settings.ts (via dist/).
// Usage: npm run build && node scripts/config-table.mjs
import { LEAVES } from '../dist/config/settings.js'

const DURATIONS = new Set(['server.shutdownDelay', 'server.shutdownTimeout', 'server.requestTimeout', 'server.headersTimeout',
  'server.keepAliveTimeout', 'upstream.timeout', 'upstream.connectTimeout',
  'auth.jwks.cacheTtl', 'auth.jwks.minRefreshInterval', 'auth.jwks.fetchTimeout', 'rateLimit.window', 'rateLimit.authFailures.window',
  'ws.messageLimit.window', 'ws.idleTimeout', 'ws.pingInterval'])
const rows = ['| YAML key | Env | Default | Meaning |', '|---|---|---|---|',
  '| – | `CONFIG_FILE` | `config/gateway.yaml` | Path of the YAML file (missing default file = defaults + env; a missing explicit file is an error). |']
for (const [path, l] of Object.entries(LEAVES)) {
  let d = l.required ? '**required**' : l.default === undefined ? 'unset' : Array.isArray(l.default) ? (l.default.length ? l.default.join(',') : '(empty)') : String(l.default)
  if (DURATIONS.has(path) && l.default !== undefined) d += ' ms'
  rows.push(`| \`${path}\` | \`${l.env}\` | ${d} | ${l.doc.replace(/\|/g, '\\|')} |`)
}
console.log(rows.join('\n'))
