#!/usr/bin/env node
/**
 * resonance-gateway [serve]                 run the gateway (same as `npm start`)
 * resonance-gateway check-config [--file F] validate config (file + env), print effective values, secrets masked
 * resonance-gateway revoke --sub S | --jti J | --sid S [--admin-url URL]
 *                                           revoke through a running gateway's admin API (token: ADMIN_TOKEN env)
 * resonance-gateway <command> --help          the command's usage (exit 0)
 * Exit codes: 0 ok, 1 failed, 2 usage.
 */
import { loadConfig, type Config } from './config/load.js'
import { CONFIG_FILE, fieldPath, LEAVES, type LeafPath } from './config/settings.js'
import { REVOCATION_KINDS, type RevocationKind } from './auth/revocation.js'

const ADMIN_HOST = LEAVES['admin.host']
const ADMIN_PORT = LEAVES['admin.port']
const ADMIN_TOKEN = LEAVES['admin.token']

const USAGE = `usage:
  resonance-gateway [serve]
  resonance-gateway check-config [--file <gateway.yaml>]
  resonance-gateway revoke (--sub <sub> | --jti <jti> | --sid <sid>) [--admin-url <http://${ADMIN_HOST.default}:${ADMIN_PORT.default}>]
      the admin token is read from the ${ADMIN_TOKEN.env} environment variable
  resonance-gateway <command> --help
`

/** `<command> --help` (or `-h`): what that command takes. */
const COMMAND_USAGE: Record<string, string> = {
  serve: `usage: resonance-gateway [serve]
  Runs the gateway (same as npm start). Configuration: the YAML file named by ${CONFIG_FILE.env}
  (default ${CONFIG_FILE.default}) and the environment; check it with check-config.
`,
  'check-config': `usage: resonance-gateway check-config [--file <gateway.yaml>]
  Validates the configuration (the YAML file and the environment) and prints every effective
  value with its environment variable, secrets masked. Exit 0 when valid, 1 when not.
  --file <path>   the YAML file (default: ${CONFIG_FILE.env}, then ${CONFIG_FILE.default})
`,
  revoke: `usage: resonance-gateway revoke (--sub <sub> | --jti <jti> | --sid <sid>) [--admin-url <url>]
  Revokes every token of a user (--sub), one token (--jti) or every token of one login session
  (--sid, the session id in the tokens' sid claim) through a running gateway's admin
  API (POST /revocations). The admin token is read from the ${ADMIN_TOKEN.env} environment variable.
  --admin-url <url>   the admin listener (default http://$${ADMIN_HOST.env}:$${ADMIN_PORT.env}, i.e. http://${ADMIN_HOST.default}:${ADMIN_PORT.default})
  Exit 0 when revoked, 1 when the gateway refused or could not be reached.
`
}

/** `--help` / `-h` in an option position: the caller asks for the command's usage. */
const HELP = 'help'

function flags (args: string[]): Map<string, string> {
  const out = new Map<string, string>()
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string
    if (a === '--help' || a === '-h') { out.set(HELP, ''); continue }
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`)
    const eq = a.indexOf('=')
    if (eq !== -1) { out.set(a.slice(2, eq), a.slice(eq + 1)); continue }
    const v = args[i + 1]
    if (v === undefined || v.startsWith('--')) {
      if (args.includes('--help') || args.includes('-h')) { out.set(HELP, ''); continue }
      throw new Error(`${a} needs a value`)
    }
    out.set(a.slice(2), v)
    i++
  }
  return out
}

/** A value for display: secrets masked, credentials in URLs masked. */
export function mask (path: LeafPath, value: unknown): string {
  if (value === undefined) return '(unset)'
  if ((LEAVES[path] as { secret?: boolean }).secret === true) return '********'
  const text = Array.isArray(value) ? value.join(',') : String(value)
  return text.replace(/(\/\/[^:/@]*:)[^@]*@/, '$1********@')
}

function checkConfig (args: string[]): number {
  const f = flags(args)
  if (f.has(HELP)) return help('check-config')
  for (const k of f.keys()) if (k !== 'file') throw new Error(`unknown option --${k}`)
  let config
  try {
    config = loadConfig({ file: f.get('file') })
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`)
    return 1
  }
  const lines = [`configuration OK (${config.source ?? 'defaults and environment'})`]
  for (const path of Object.keys(LEAVES) as LeafPath[]) {
    const leaf = LEAVES[path]
    const fromEnv = process.env[leaf.env] !== undefined && process.env[leaf.env] !== ''
    lines.push(`  ${path.padEnd(30)} ${leaf.env.padEnd(28)} ${mask(path, effective(config, path))}${fromEnv ? '   (env)' : ''}`)
  }
  lines.push(`  auth.publicPaths               ${config.auth.publicPaths.length} pattern(s)${config.auth.publicPaths.length > 0 ? ': ' + config.auth.publicPaths.join(', ') : ''}`)
  lines.push(`  auth.routes                    ${config.auth.routes.length} role rule(s)`)
  lines.push(`  rateLimit.routes               ${config.rateLimit.routes.length} route limit(s)`)
  lines.push(`  rateLimit.roles                ${config.rateLimit.roles.map((r) => `${r.role}=${r.max}/${r.windowMs}ms`).join(', ') || '(none)'}`)
  lines.push(`  rateLimit.exempt               subs: ${config.rateLimit.exempt.subs.length}, roles: ${config.rateLimit.exempt.roles.join(',') || '(none)'}`)
  process.stdout.write(lines.join('\n') + '\n')
  return 0
}

/**
 * The effective value of a leaf: its Config field (what the gateway uses, e.g.
 * the audiences for an empty JWT_ROLE_CLIENTS), else what file and env resolved to.
 */
function effective (config: Config, path: LeafPath): unknown {
  const at = fieldPath(path)
  if (at === undefined) return config.leaves[path]
  return at.split('.').reduce<unknown>((node, k) => (node as Record<string, unknown>)[k], config)
}

async function revoke (args: string[]): Promise<number> {
  const f = flags(args)
  if (f.has(HELP)) return help('revoke')
  for (const k of f.keys()) if (!['sub', 'jti', 'sid', 'admin-url'].includes(k)) throw new Error(`unknown option --${k}`)
  const kinds = REVOCATION_KINDS.filter((k) => f.get(k) !== undefined)
  if (kinds.length !== 1) throw new Error('give exactly one of --sub, --jti or --sid')
  const kind = kinds[0] as RevocationKind
  const token = process.env[ADMIN_TOKEN.env]
  if (token === undefined || token === '') {
    process.stderr.write(`resonance-gateway revoke: set ${ADMIN_TOKEN.env} to the gateway's admin token\n`)
    return 1
  }
  const adminUrl = f.get('admin-url') ?? `http://${process.env[ADMIN_HOST.env] ?? ADMIN_HOST.default}:${process.env[ADMIN_PORT.env] ?? ADMIN_PORT.default}`
  let res: Response
  try {
    res = await fetch(new URL('/revocations', adminUrl), {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
      body: JSON.stringify({ [kind]: f.get(kind) }),
      signal: AbortSignal.timeout(10_000)
    })
  } catch (err) {
    process.stderr.write(`resonance-gateway revoke: cannot reach ${adminUrl}: ${(err as Error).message}\n`)
    return 1
  }
  const text = await res.text()
  if (!res.ok) {
    process.stderr.write(`resonance-gateway revoke: HTTP ${res.status}: ${text}\n`)
    return 1
  }
  process.stdout.write(text + '\n')
  return 0
}

function help (command: string): number {
  process.stdout.write(COMMAND_USAGE[command] as string)
  return 0
}

async function cli (argv: string[]): Promise<number> {
  const [command = 'serve', ...rest] = argv
  try {
    switch (command) {
      case 'serve': {
        if (rest.includes('--help') || rest.includes('-h')) return help('serve')
        const extra = rest[0]
        if (extra !== undefined) throw new Error(extra.startsWith('--') ? `unknown option ${extra.split('=')[0] as string}` : `unexpected argument ${extra}`)
        await import('./server.js')
        return -1 // keeps running
      }
      case 'check-config':
        return checkConfig(rest)
      case 'revoke':
        return await revoke(rest)
      case '--help':
      case '-h':
      case 'help':
        process.stdout.write(USAGE)
        return 0
      default:
        throw new Error(`unknown command ${command}`)
    }
  } catch (err) {
    process.stderr.write(`resonance-gateway: ${(err as Error).message}\n${USAGE}`)
    return 2
  }
}

cli(process.argv.slice(2)).then((code) => { if (code >= 0) process.exitCode = code }, (err: Error) => {
  process.stderr.write(`resonance-gateway: ${err.message}\n`)
  process.exitCode = 1
})
