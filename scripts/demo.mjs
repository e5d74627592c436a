#!/usr/bin/env node
// `npm run demo`: the whole product in one command, on a fresh clone, without Docker, Keycloak or Redis.
//
//   1. a DEVELOPMENT ISSUER, in this process: an RSA key made at start, OIDC discovery, a JWKS and a token endpoint
//      that mints Keycloak-shaped access tokens for any `sub`/`roles` it is asked for (each with a login session id,
//      `sid`), and a logout endpoint that ends a session as Keycloak does: it POSTs a signed logout token to the
//      gateway's back-channel logout endpoint. It exists only here: `npm start` never starts it, and it binds
//      127.0.0.1 only. Its token and logout endpoints answer CORS for the gateway's origin only, so that the browser
//      page (below) can sign in and log out.
//   2. the stand-in app (deploy/standin-app/server.mjs): REST under /api/resonance, a WebSocket at /ws/resonance, and
//      a browser page at /demo/ (deploy/standin-app/demo.html, a public path of the demo gateway) that signs in at
//      the issuer, calls the REST API, holds a WebSocket with the `bearer` subprotocol and logs out.
//   3. the gateway, exactly as `npm start` runs it (`node dist/server.js`), configured by deploy/demo/gateway.yaml and
//      the environment, with in-process limits (no REDIS_URL).
//
// When the gateway is ready (/readyz 200) it prints commands to paste, tokens included. Every command is one line
// starting with "$ ", preceded by a "# [id] ..." line saying what it shows (test/demo.test.ts runs them).
//
// Environment: DEMO_PORT (8080) and DEMO_ADMIN_PORT (9090) for the gateway, DEMO_ISSUER_PORT and DEMO_APP_PORT
// (default: any free port), DEMO_LOG_LEVEL (warn: config warnings and one audit line per denial).
// Ctrl-C (SIGINT) or SIGTERM stops everything and exits 0; if a part dies on its own, the demo stops the rest and
// exits 1.
import { spawn } from 'node:child_process'
import { randomBytes, randomUUID } from 'node:crypto'
import { existsSync } from 'node:fs'
import http from 'node:http'
import net from 'node:net'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { SignJWT, calculateJwkThumbprint, exportJWK, generateKeyPair } from 'jose'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const GATEWAY_ENTRY = join(ROOT, 'dist', 'server.js')
const APP_ENTRY = join(ROOT, 'deploy', 'standin-app', 'server.mjs')
const DEMO_CONFIG = join(ROOT, 'deploy', 'demo', 'gateway.yaml')
const ORPHAN_GUARD = pathToFileURL(join(ROOT, 'deploy', 'demo', 'orphan-guard.mjs')).href
const HOST = '127.0.0.1'
const REALM_PATH = '/realms/demo'
const AUDIENCE = 'resonance-gateway'
/** The client the demo's users "logged in to" (their tokens' azp); Keycloak addresses logout tokens to it. */
const LOGIN_CLIENT = 'resonance-demo'
const LOGOUT_PATH = '/backchannel-logout'
const SID = /^[A-Za-z0-9._-]{1,64}$/
const TOKEN_TTL_S = 3600
const READY_TIMEOUT_MS = 30_000
const STOP_TIMEOUT_MS = 5_000

/** A port from the environment; `min` 0 allows "any free port". */
function portFrom (name, fallback, min) {
  const raw = process.env[name]
  if (raw === undefined || raw === '') return fallback
  const n = Number(raw)
  if (!/^\d+$/.test(raw) || n < min || n > 65_535) fatal(`${name} must be a port number (${min}-65535), got ${JSON.stringify(raw)}`)
  return n
}

function fatal (message) {
  process.stderr.write(`demo: ${message}\n`)
  process.exit(1)
}

const log = (line) => process.stdout.write(line + '\n')

// ---------------------------------------------------------------------------------------------------------------
// The development issuer
// ---------------------------------------------------------------------------------------------------------------

const SUB = /^[A-Za-z0-9._@-]{1,64}$/
const ROLE = /^[A-Za-z0-9._:-]{1,64}$/

/** `origins`: the browser origins (the gateway's) allowed to call the token and logout endpoints. */
async function startIssuer (port, origins) {
  const { publicKey, privateKey } = await generateKeyPair('RS256', { modulusLength: 2048 })
  const jwk = await exportJWK(publicKey)
  const kid = await calculateJwkThumbprint(jwk)
  const jwks = JSON.stringify({ keys: [{ ...jwk, kid, alg: 'RS256', use: 'sig' }] })
  let issuer = ''

  let logoutTarget // the gateway's back-channel logout URL, known once the gateway runs

  const mint = async ({ sub, roles, ttl, sid = randomUUID() }) => {
    const now = Math.floor(Date.now() / 1000)
    // Shaped like a Keycloak access token of a client with an audience mapper.
    return await new SignJWT({
      typ: 'Bearer',
      azp: LOGIN_CLIENT,
      sid,
      preferred_username: sub,
      realm_access: { roles },
      scope: 'openid profile email'
    })
      .setProtectedHeader({ alg: 'RS256', typ: 'JWT', kid })
      .setIssuer(issuer)
      .setAudience(AUDIENCE)
      .setSubject(sub)
      .setIssuedAt(now)
      .setExpirationTime(now + ttl)
      .setJti(randomUUID())
      .sign(privateKey)
  }

  /** Ends a login session as Keycloak does: a logout token (OIDC Back-Channel Logout 1.0) POSTed to the gateway. */
  const logout = async ({ sub, sid }) => {
    const now = Math.floor(Date.now() / 1000)
    const claims = { events: { 'http://schemas.openid.net/event/backchannel-logout': {} }, ...(sid !== undefined ? { sid } : {}) }
    let jwt = new SignJWT(claims).setProtectedHeader({ alg: 'RS256', typ: 'logout+jwt', kid })
      .setIssuer(issuer).setAudience(LOGIN_CLIENT).setIssuedAt(now).setExpirationTime(now + 120).setJti(randomUUID())
    if (sub !== undefined) jwt = jwt.setSubject(sub)
    const res = await fetch(logoutTarget, {
      method: 'POST',
      body: new URLSearchParams({ logout_token: await jwt.sign(privateKey) }),
      signal: AbortSignal.timeout(5000)
    })
    return { status: res.status, body: await res.text() }
  }

  const json = (res, status, body) => {
    res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' })
    res.end(JSON.stringify(body))
  }

  const server = http.createServer((req, res) => {
    const path = new URL(req.url ?? '/', 'http://issuer').pathname
    // CORS for the browser page, which the gateway serves: its origin only, and only on the token and logout endpoints.
    if (path === `${REALM_PATH}/protocol/openid-connect/token` || path === `${REALM_PATH}/protocol/openid-connect/logout`) {
      res.setHeader('vary', 'Origin')
      const origin = req.headers.origin
      if (origin !== undefined && origins.includes(origin)) {
        res.setHeader('access-control-allow-origin', origin)
        if (req.method === 'OPTIONS') {
          res.writeHead(204, { 'access-control-allow-methods': 'POST', 'access-control-allow-headers': 'content-type', 'access-control-max-age': '600' })
          return res.end()
        }
      }
    }
    if (req.method === 'GET' && path === `${REALM_PATH}/.well-known/openid-configuration`) {
      return json(res, 200, {
        issuer,
        jwks_uri: `${issuer}/protocol/openid-connect/certs`,
        token_endpoint: `${issuer}/protocol/openid-connect/token`,
        grant_types_supported: ['urn:demo:any-user'],
        response_types_supported: ['token'],
        subject_types_supported: ['public'],
        id_token_signing_alg_values_supported: ['RS256'],
        token_endpoint_auth_methods_supported: ['none']
      })
    }
    if (req.method === 'GET' && path === `${REALM_PATH}/protocol/openid-connect/certs`) {
      res.writeHead(200, { 'content-type': 'application/json' })
      return res.end(jwks)
    }
    if (req.method === 'POST' && path === `${REALM_PATH}/protocol/openid-connect/logout`) {
      return readForm(req, (form) => {
        const sid = form.get('sid') ?? undefined
        const sub = form.get('sub') ?? undefined
        if ((sid === undefined && sub === undefined) || (sid !== undefined && !SID.test(sid)) || (sub !== undefined && !SUB.test(sub))) {
          return json(res, 400, { error: 'invalid_request', error_description: 'form fields: sid=<session id> and/or sub=<user>' })
        }
        logout({ sub, sid }).then(
          (r) => json(res, 200, { logged_out: { sub, sid }, gateway: r.status }),
          (err) => json(res, 502, { error: 'gateway_unreachable', error_description: err.message })
        )
      })
    }
    if (req.method === 'POST' && path === `${REALM_PATH}/protocol/openid-connect/token`) {
      let body = ''
      req.setEncoding('utf8')
      req.on('data', (c) => {
        body += c
        if (body.length > 8192) req.destroy()
      })
      req.on('end', () => {
        const form = new URLSearchParams(body)
        const sub = form.get('sub') ?? form.get('username') ?? ''
        const roles = (form.get('roles') ?? '').split(',').map((r) => r.trim()).filter((r) => r !== '')
        const ttl = form.has('ttl') ? Number(form.get('ttl')) : TOKEN_TTL_S
        const sid = form.get('sid') ?? undefined
        if (!SUB.test(sub) || !roles.every((r) => ROLE.test(r)) || !Number.isInteger(ttl) || ttl < 1 || ttl > 86_400 || (sid !== undefined && !SID.test(sid))) {
          return json(res, 400, { error: 'invalid_request', error_description: 'form fields: sub=<[A-Za-z0-9._@-]{1,64}>, roles=<comma list>, ttl=<1..86400 s>, sid=<session id, optional>' })
        }
        mint({ sub, roles, ttl, sid }).then(
          (token) => json(res, 200, { access_token: token, token_type: 'Bearer', expires_in: ttl, scope: 'openid profile email' }),
          (err) => json(res, 500, { error: 'server_error', error_description: err.message })
        )
      })
      return
    }
    json(res, 404, { error: 'not_found' })
  })
  await listen(server, port)
  issuer = `http://${HOST}:${server.address().port}${REALM_PATH}`
  return { issuer, server, mint, setLogoutTarget: (url) => { logoutTarget = url } }
}

/** A small form body (at most 8 KiB), parsed. */
function readForm (req, then) {
  let body = ''
  req.setEncoding('utf8')
  req.on('data', (c) => {
    body += c
    if (body.length > 8192) req.destroy()
  })
  req.on('end', () => then(new URLSearchParams(body)))
}

async function listen (server, port) {
  await new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, HOST, () => { server.off('error', reject); resolve() })
  })
}

async function portIsFree (port) {
  if (port === 0) return true
  const srv = net.createServer()
  return await new Promise((resolve) => {
    srv.once('error', () => resolve(false))
    srv.listen(port, HOST, () => srv.close(() => resolve(true)))
  })
}

// ---------------------------------------------------------------------------------------------------------------
// Children: the stand-in app and the gateway
// ---------------------------------------------------------------------------------------------------------------

const children = []
let stopping = false

/** One line of a child's output, made readable: gateway JSON logs become `level msg key=value ...`. */
function pretty (name, line) {
  let entry
  try { entry = JSON.parse(line) } catch { return `[${name}] ${line}` }
  if (entry === null || typeof entry !== 'object') return `[${name}] ${line}`
  const level = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' }[entry.level] ?? ''
  const skip = new Set(['level', 'time', 'pid', 'hostname', 'msg'])
  const fields = Object.entries(entry).filter(([k, v]) => !skip.has(k) && v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
  return `[${name}] ${level ? level + ': ' : ''}${entry.msg ?? ''}${fields.length > 0 ? '  ' + fields.join(' ') : ''}`
}

function startChild (name, args, env) {
  // Own process group: Ctrl-C in the terminal reaches only the demo, which then stops each child once (SIGTERM).
  // The orphan guard stops a child by itself if the demo is killed without cleaning up.
  const child = spawn(process.execPath, ['--import', ORPHAN_GUARD, ...args], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true })
  const entry = { name, child, exited: new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal }))) }
  children.push(entry)
  const lines = []
  const listeners = []
  for (const stream of [child.stdout, child.stderr]) {
    let buf = ''
    stream.setEncoding('utf8')
    stream.on('data', (chunk) => {
      buf += chunk
      let i
      while ((i = buf.indexOf('\n')) !== -1) {
        const line = buf.slice(0, i)
        buf = buf.slice(i + 1)
        if (line === '') continue
        if (lines.length < 100) lines.push(line) // only the start-up lines are looked up (onLine)
        for (const l of listeners) l(line)
        log(pretty(name, line))
      }
    })
  }
  child.once('error', (err) => {
    if (!stopping) stop(1, `could not start the ${name}: ${err.message}`)
  })
  entry.exited.then(({ code, signal }) => {
    if (!stopping) stop(1, `the ${name} exited on its own (${signal ?? `code ${code}`}); stopping the demo`)
  })
  entry.onLine = (fn) => { lines.forEach(fn); listeners.push(fn) }
  return entry
}

async function stop (code, why) {
  if (stopping) return
  stopping = true
  if (why !== undefined) process.stderr.write(`demo: ${why}\n`)
  for (const { child } of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM')
  const all = Promise.all(children.map((c) => c.exited))
  const timer = setTimeout(() => {
    for (const { child } of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
  }, STOP_TIMEOUT_MS)
  await all
  clearTimeout(timer)
  if (issuerServer !== undefined) {
    issuerServer.closeAllConnections()
    await new Promise((resolve) => issuerServer.close(() => resolve()))
  }
  if (code === 0) log('demo: stopped (gateway, stand-in app and development issuer)')
  process.exit(code)
}

let firstSignal

function onSignal (signal) {
  if (stopping) {
    // `npm run demo` delivers one Ctrl-C twice: the terminal signals the whole process group (npm and this process)
    // and npm forwards what it got to its child. The same signal within a second is that copy, not a second Ctrl-C.
    if (firstSignal !== undefined && firstSignal.signal === signal && Date.now() - firstSignal.at < 1000) return
    // A second Ctrl-C: no more waiting.
    for (const { child } of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    process.exit(1)
  }
  firstSignal = { signal, at: Date.now() }
  log(`demo: ${signal}: stopping...`)
  stop(0)
}
process.on('SIGINT', () => onSignal('SIGINT'))
process.on('SIGTERM', () => onSignal('SIGTERM'))
process.on('SIGHUP', () => onSignal('SIGHUP'))
process.on('exit', () => {
  // Last resort (e.g. an uncaught exception): never leave a child behind.
  for (const { child } of children) if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
})

async function waitFor (what, fn, timeoutMs) {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (stopping) return await new Promise(() => {}) // stop() exits the process
    const v = await fn().catch(() => undefined)
    if (v !== undefined) return v
    await sleep(150)
  }
  await stop(1, `${what} not within ${timeoutMs / 1000} s (see the [app] / [gateway] lines above)`)
}

async function httpStatus (url) {
  return await new Promise((resolve, reject) => {
    const req = http.get(url, { agent: false, timeout: 2000 }, (res) => { res.resume(); resolve(res.statusCode) })
    req.on('timeout', () => req.destroy(new Error('timeout')))
    req.on('error', reject)
  })
}

// ---------------------------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------------------------

let issuerServer

async function main () {
  // The gateway's ports are fixed (the printed commands name them); the issuer and the app take any free port.
  const port = portFrom('DEMO_PORT', 8080, 1)
  const adminPort = portFrom('DEMO_ADMIN_PORT', 9090, 1)
  const issuerPort = portFrom('DEMO_ISSUER_PORT', 0, 0)
  const appPort = portFrom('DEMO_APP_PORT', 0, 0)
  const logLevel = process.env.DEMO_LOG_LEVEL || 'warn'

  if (!existsSync(GATEWAY_ENTRY)) fatal(`${GATEWAY_ENTRY} is missing: run \`npm run build\` first (\`npm run demo\` does).`)
  for (const [name, p] of [['DEMO_PORT', port], ['DEMO_ADMIN_PORT', adminPort], ['DEMO_ISSUER_PORT', issuerPort], ['DEMO_APP_PORT', appPort]]) {
    if (!(await portIsFree(p))) fatal(`port ${p} on ${HOST} is in use: stop what uses it or choose another with ${name}=...`)
  }

  const issuer = await startIssuer(issuerPort, [`http://${HOST}:${port}`, `http://localhost:${port}`])
  issuerServer = issuer.server
  log('')
  log('#'.repeat(86))
  log('##')
  log('##  DEVELOPMENT ISSUER — never use in production')
  log('##')
  log(`##  ${issuer.issuer}`)
  log('##  mints a token for ANY user and role it is asked for. It exists only inside')
  log('##  `npm run demo`, on 127.0.0.1; `npm start` never starts it.')
  log('##')
  log('#'.repeat(86))
  log('')

  // A clean environment: nothing from the caller's shell (REDIS_URL, JWT_*, NODE_OPTIONS) leaks into the parts.
  const baseEnv = { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? ROOT, LANG: process.env.LANG ?? 'C.UTF-8' }
  const app = startChild('app', [APP_ENTRY], { ...baseEnv, HOST, PORT: String(appPort), DEMO_ISSUER: issuer.issuer })
  let appListening
  app.onLine((line) => {
    try {
      const m = JSON.parse(line)
      if (m.msg === 'stand-in app listening' && typeof m.port === 'number') appListening = m.port
    } catch {}
  })
  const upstreamPort = await waitFor('the stand-in app', async () => appListening, 10_000)

  const adminToken = `demo-admin-${randomBytes(12).toString('hex')}`
  const gateway = startChild('gateway', [GATEWAY_ENTRY], {
    ...baseEnv,
    CONFIG_FILE: DEMO_CONFIG,
    JWT_ISSUER: issuer.issuer,
    JWT_AUDIENCE: AUDIENCE,
    UPSTREAM_URL: `http://${HOST}:${upstreamPort}`,
    ALLOW_INSECURE_HTTP: 'true',
    HOST,
    PORT: String(port),
    ADMIN_HOST: HOST,
    ADMIN_PORT: String(adminPort),
    ADMIN_TOKEN: adminToken,
    LOG_LEVEL: logLevel,
    BACKCHANNEL_LOGOUT_PATH: LOGOUT_PATH,
    BACKCHANNEL_LOGOUT_AUDIENCE: LOGIN_CLIENT
  })
  const gw = `http://${HOST}:${port}`
  const admin = `http://${HOST}:${adminPort}`
  await waitFor('gateway readiness (GET /readyz = 200)', async () => (await httpStatus(`${admin}/readyz`)) === 200 ? true : undefined, READY_TIMEOUT_MS)
  issuer.setLogoutTarget(`${gw}${LOGOUT_PATH}`)

  const bob = await issuer.mint({ sub: 'bob', roles: [], ttl: TOKEN_TTL_S })
  const alice = await issuer.mint({ sub: 'alice', roles: ['premium'], ttl: TOKEN_TTL_S })
  const erin = await issuer.mint({ sub: 'erin', roles: [], ttl: TOKEN_TTL_S, sid: 'erin-session-1' })
  const tokenUrl = `${issuer.issuer}/protocol/openid-connect/token`
  const logoutUrl = `${issuer.issuer}/protocol/openid-connect/logout`
  // Holds a WebSocket with erin's token, logs her session out at the issuer, shows the close, then one more request.
  const logoutLine = 'node -e "' + [
    `const WebSocket=require('ws');const T='${erin}'`,
    `const ws=new WebSocket('ws://${HOST}:${port}/ws/resonance',['bearer',T]);let at,lo`,
    "ws.on('open',()=>{console.log('WebSocket open');at=Date.now()",
    `lo=fetch('${logoutUrl}',{method:'POST',body:new URLSearchParams({sid:'erin-session-1'})}).then(async(r)=>console.log('issuer logout: '+JSON.stringify(await r.json())))})`,
    // The close may come before the issuer's answer (the gateway closes the socket before it answers the issuer).
    "ws.on('close',async(c,r)=>{console.log('WebSocket closed: '+c+' '+r+' ('+(Date.now()-at)+' ms after the logout)');await lo",
    `const h=await fetch('${gw}/api/resonance/entries',{headers:{authorization:'Bearer '+T}});console.log('next request: HTTP '+h.status+' '+h.headers.get('www-authenticate'));process.exit(0)})`,
    "ws.on('unexpected-response',(q,r)=>{console.log('HTTP '+r.statusCode);process.exit(1)})",
    "ws.on('error',(e)=>{console.error(e.message);process.exit(1)})",
    'setTimeout(()=>process.exit(1),8000).unref()'
  ].join(';') + '"'
  const wsLine = (token) => 'node -e "' + [
    `const WebSocket=require('ws');const ws=new WebSocket('ws://${HOST}:${port}/ws/resonance',['bearer','${token}'])`,
    "ws.on('open',()=>ws.send('hello from the demo'))",
    "ws.on('message',(m)=>{console.log(String(m));if(String(m)==='hello from the demo')ws.close()})",
    "ws.on('unexpected-response',(q,r)=>{console.log('HTTP '+r.statusCode);process.exit(1)})",
    "ws.on('error',(e)=>{console.error(e.message);process.exit(1)})",
    'setTimeout(()=>process.exit(1),5000).unref()'
  ].join(';') + '"'

  const commands = [
    ['valid-token', '200: bob (a normal user) reads entries; the app sees the verified identity in X-User-* headers',
      `curl -i -H "Authorization: Bearer ${bob}" ${gw}/api/resonance/entries`],
    ['no-token', '401: no token, with WWW-Authenticate: Bearer and an audit line below',
      `curl -i ${gw}/api/resonance/entries`],
    ['public', '200 without a token: a public path (auth.publicPaths in deploy/demo/gateway.yaml)',
      `curl -i ${gw}/api/resonance/health`],
    ['premium', '200: alice has the realm role premium, which /api/resonance/premium/** requires',
      `curl -i -H "Authorization: Bearer ${alice}" ${gw}/api/resonance/premium/insights`],
    ['forbidden', '403: bob lacks the premium role',
      `curl -i -H "Authorization: Bearer ${bob}" ${gw}/api/resonance/premium/insights`],
    ['rate-limit', '429: bob may make 10 requests a minute (premium users 1000): 200s, then 429s with Retry-After (seconds)',
      `for i in $(seq 1 12); do curl -s -o /dev/null -D - -H "Authorization: Bearer ${bob}" ${gw}/api/resonance/entries | tr -d '\\r' | awk 'NR == 1 { s = $2 } tolower($1) == "retry-after:" { r = "  Retry-After: " $2 } END { print s r }'; done`],
    ['websocket', 'WebSocket through the gateway (token in Sec-WebSocket-Protocol: bearer, <token>): greeting, then the echo',
      wsLine(alice)],
    ['metrics', `Prometheus metrics on the admin port (${admin}/metrics), non-zero resonance_* series`,
      `curl -s ${admin}/metrics | grep '^resonance_' | grep -v ' 0$'`],
    ['new-token', 'a fresh token from the development issuer (any sub, comma-separated roles), then a call with it',
      `TOKEN=$(curl -s -d sub=carol -d roles=premium ${tokenUrl} | node -pe 'JSON.parse(require("fs").readFileSync(0)).access_token'); curl -i -H "Authorization: Bearer $TOKEN" ${gw}/api/resonance/entries`],
    ['logout', 'logout at the issuer ends the session at the gateway: erin holds a WebSocket; the development issuer POSTs a logout token (sid) to the gateway\'s back-channel logout endpoint; the WebSocket closes with 1008 "session ended" and her next request gets 401',
      logoutLine],
    ['revoke', 'revoke every token bob holds (admin API through the CLI); then the first command answers 401 (reason revoked)',
      `ADMIN_TOKEN=${adminToken} node dist/cli.js revoke --sub bob --admin-url ${admin}`]
  ]

  log('')
  log('='.repeat(86))
  log(`The gateway is ready: ${gw} -> stand-in app http://${HOST}:${upstreamPort} (REST /api/resonance, WebSocket /ws/resonance)`)
  log(`Admin port: ${admin}  (/metrics /healthz /readyz)    Metrics: ${admin}/metrics`)
  log(`Issuer: ${issuer.issuer} (development only)    Config: deploy/demo/gateway.yaml, limits in-process (no Redis)`)
  log(`Processes: gateway pid=${gateway.child.pid} app pid=${app.child.pid} demo pid=${process.pid}`)
  log(`Browser page: ${gw}/demo/  (sign in, REST and WebSocket through the gateway, the rate-limit close, log out)`)
  log('Tokens below are valid for 1 hour. Paste any command into another terminal (from this directory):')
  log('='.repeat(86))
  for (const [id, what, cmd] of commands) {
    log('')
    log(`# [${id}] ${what}`)
    log(`$ ${cmd}`)
  }
  log('')
  log('Press Ctrl-C to stop the gateway, the stand-in app and the issuer.')
  log('')
}

main().catch((err) => {
  if (stopping) return
  stop(1, `failed: ${err.stack ?? err.message}`)
})
