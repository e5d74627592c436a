// The demo's browser page (deploy/standin-app/demo.html, served by the stand-in app through the gateway at /demo/) in a
// real headless Chromium (Debian's `chromium`, driven by playwright-core; .ci/run installs it): `npm run demo` is started
// as test/demo.test.ts does, the page signs a user in at the development issuer (CORS), calls the REST API with the
// token, opens /ws/resonance with the token in the subprotocol list (['bearer', token]: the browser accepts the 101 only
// when the server chose a subprotocol it offered), exchanges messages, shows the rate-limit close (1008) and, after a
// second sign-in, the close on "Log out" (1008 "session ended" within 1 s of the click, measured in the page) and the
// old token's 401. Skipped with a message where Chromium is missing or cannot start.
import { execFileSync, spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { chromium, type Browser, type Page } from 'playwright-core'
import t from 'tap'
import { canBind, freePort } from './helpers/ports.js'
import { until } from './helpers/wait.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const DEMO = join(ROOT, 'scripts', 'demo.mjs')
const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium'

/** What the page keeps in window.demo (see demo.html). */
interface PageState {
  token: string | null
  sid: string | null
  rest: number | null
  protocol: string | null
  open: boolean
  received: string[]
  sent: number
  close: { code: number, reason: string, wasClean: boolean, msAfterLogout: number | null } | null
  logout: { status: number, body: unknown } | null
  restAfter: { status: number, wwwAuthenticate: string | null } | null
}

/** A started browser, or why there is none (the test is then skipped with that message). */
async function launch (): Promise<Browser | string> {
  if (!existsSync(CHROMIUM)) return `no Chromium at ${CHROMIUM} (apt-get install chromium; .ci/run installs it)`
  try {
    return await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'], timeout: 30_000 })
  } catch (err) {
    return `Chromium at ${CHROMIUM} could not be launched: ${(err as Error).message.split('\n')[0] as string}`
  }
}

const browser = await launch()
if (typeof browser !== 'string') t.teardown(async () => { await browser.close() })

t.before(() => {
  if (!existsSync(join(ROOT, 'dist', 'server.js')) || !existsSync(join(ROOT, 'dist', 'cli.js'))) {
    execFileSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'ignore' })
  }
})

t.test('the demo page in headless Chromium: sign-in, REST, WebSocket with the bearer subprotocol, rate-limit close, logout close', { skip: typeof browser === 'string' ? browser : false }, async (t) => {
  const b = browser as Browser
  const port = await freePort()
  const adminPort = await freePort()
  // The environment of a fresh shell, as test/demo.test.ts starts it: nothing from tap (NODE_OPTIONS loaders, coverage).
  const child = spawn(process.execPath, [DEMO], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? ROOT, DEMO_PORT: String(port), DEMO_ADMIN_PORT: String(adminPort) },
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let out = ''
  child.stdout.setEncoding('utf8').on('data', (c: string) => { out += c })
  child.stderr.setEncoding('utf8').on('data', (c: string) => { out += c })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGINT')
      const timer = setTimeout(() => child.kill('SIGKILL'), 8000)
      await exited
      clearTimeout(timer)
    }
  })
  await until(() => {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`the demo exited before it got ready:\n${out}`)
    return /^Press Ctrl-C to stop/m.test(out)
  }, 60_000, () => `the demo did not get ready:\n${out}`, 100)

  const pageUrl = /^Browser page: (http:\/\/127\.0\.0\.1:\d+\/demo\/) /m.exec(out)?.[1]
  t.equal(pageUrl, `http://127.0.0.1:${port}/demo/`, 'the demo prints the page\'s URL (the gateway\'s origin)')
  const issuer = /^## {2}(http:\/\/127\.0\.0\.1:\d+\/realms\/demo)$/m.exec(out)?.[1] as string
  t.ok(issuer, 'the issuer URL is printed')

  // CORS on the development issuer: the gateway's origin only.
  const preflight = (origin: string): Promise<Response> => fetch(`${issuer}/protocol/openid-connect/token`, {
    method: 'OPTIONS', headers: { origin, 'access-control-request-method': 'POST' }
  })
  t.equal((await preflight(`http://127.0.0.1:${port}`)).headers.get('access-control-allow-origin'), `http://127.0.0.1:${port}`, 'the issuer allows the gateway\'s origin')
  t.equal((await preflight('http://evil.example')).headers.get('access-control-allow-origin'), null, 'and no other origin')

  const context = await b.newContext()
  t.teardown(async () => { await context.close() })
  const page: Page = await context.newPage()
  const consoleErrors: string[] = []
  page.on('console', (m) => { if (m.type() === 'error') consoleErrors.push(m.text()) })
  const state = async (): Promise<PageState> => await page.evaluate(() => (globalThis as unknown as { demo: PageState }).demo)
  const waitState = async (what: string, cond: string): Promise<PageState> => {
    try {
      await page.waitForFunction(cond, null, { timeout: 10_000 })
    } catch (err) {
      throw new Error(`${what}: ${(err as Error).message.split('\n')[0] as string}\npage log:\n${await page.textContent('#log') ?? ''}\ndemo output:\n${out}`)
    }
    return await state()
  }

  const started = Date.now()
  // /demo redirects to /demo/: both are public paths of the demo gateway, so the page itself needs no token.
  const nav = await page.goto(`http://127.0.0.1:${port}/demo`)
  t.equal(nav?.status(), 200, 'the page is served through the gateway without a token')
  t.equal(page.url(), `http://127.0.0.1:${port}/demo/`, '/demo redirects to /demo/')
  t.equal(await page.inputValue('#issuer'), issuer, 'the page knows the development issuer')

  // 1. Sign in, REST, WebSocket.
  await page.fill('#sub', 'dana')
  await page.click('#signin')
  let s = await waitState('the WebSocket opens', 'window.demo.open === true')
  t.equal(s.rest, 200, 'REST: GET /api/resonance/entries with the token -> 200')
  t.match(await page.textContent('#rest'), /HTTP 200 .*"sub":"dana"/, 'the page shows the identity the app saw')
  t.equal(s.protocol, 'bearer', 'the browser accepted the 101: the server chose `bearer`, a subprotocol the browser offered')
  t.equal(await page.textContent('#ws-state'), 'open')
  s = await waitState('the app\'s greeting arrives', 'window.demo.received.length >= 1')
  t.equal(s.received[0], '{"hello":"dana"}', 'app -> browser: the stand-in\'s greeting names the verified user')
  await page.fill('#message', 'hello from chromium')
  await page.click('#send')
  s = await waitState('the echo arrives', 'window.demo.received.includes("hello from chromium")')
  t.ok(s.received.includes('hello from chromium'), 'browser -> app -> browser: the message was echoed')

  // 2. The rate-limit close: 30 messages at once, over the demo's ws.messageLimit (20 a minute).
  await page.click('#burst')
  s = await waitState('the rate-limit close', 'window.demo.close !== null')
  t.same({ code: s.close?.code, reason: s.close?.reason }, { code: 1008, reason: 'message rate limit exceeded' }, 'over the message limit: closed with 1008')
  t.match(await page.textContent('#ws-close'), /^1008 "message rate limit exceeded"/, 'the page shows the close code and reason')

  // 3. Sign in again (a new session), then log out at the issuer: the gateway closes that session's WebSocket.
  await page.click('#signin')
  s = await waitState('the second WebSocket opens', 'window.demo.open === true && window.demo.received.length >= 1')
  t.equal(s.protocol, 'bearer', 'second session: WebSocket open with `bearer`')
  const sid = s.sid as string
  t.match(sid, /^page-/, 'the page made its own session id')
  await page.click('#logout')
  s = await waitState('the logout close and the next request', 'window.demo.close !== null && window.demo.restAfter !== null && window.demo.logout !== null')
  t.same({ code: s.close?.code, reason: s.close?.reason }, { code: 1008, reason: 'session ended' }, 'logout: closed with 1008 "session ended"')
  const ms = s.close?.msAfterLogout as number
  t.ok(ms >= 0 && ms < 1000, `closed within 1 s of the "Log out" click (${ms} ms, measured in the page)`)
  t.match(await page.textContent('#ws-close'), /^1008 "session ended", \d+ ms after "Log out"$/, 'the page shows the close and its delay')
  t.equal(s.logout?.status, 200, 'the issuer logout answered 200')
  t.match(s.logout?.body, { logged_out: { sid }, gateway: 200 }, 'the gateway accepted the logout token for that session')
  t.equal(s.restAfter?.status, 401, 'REST with the old token -> 401')
  t.match(s.restAfter?.wwwAuthenticate, /^Bearer .*error="invalid_token"/, 'invalid_token')
  t.same(consoleErrors.filter((e) => !/WebSocket|Failed to load resource/.test(e)), [], 'no script errors on the page')
  t.comment(`browser steps took ${Date.now() - started} ms; logout -> close ${ms} ms`)

  child.kill('SIGINT')
  await exited
  t.ok(await canBind(port), 'the demo stopped: gateway port free')
})
