// The Node the container image runs (the Dockerfile's NODE_IMAGE), for bench
// rows that must measure the shipped runtime rather than the machine's Node:
// V8's tiers differ between releases (Node 22+ adds the Maglev compiler,
// which is what a cold process runs on in its first seconds). The npm
// registry ships the official binaries as node-<platform>-<arch>@<version>
// (bin/node, no install script); one copy is kept per version in the
// temporary directory.
import { execFileSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

/** The registry download is ~30 MB; a stalled npm must not hang the whole bench. */
const INSTALL_TIMEOUT_MS = 300_000

/** The x.y.z of `ARG NODE_IMAGE=node:x.y.z-...` in `dockerfile`, or undefined. */
export function imageNodeVersion (dockerfile) {
  return /^ARG NODE_IMAGE=node:(\d+\.\d+\.\d+)-/m.exec(readFileSync(dockerfile, 'utf8'))?.[1]
}

/**
 * { version, path } of the image's Node: this process's own binary when it is
 * that version, else a copy from the npm registry (installed on first use).
 * Throws with what to do when neither works.
 */
export function imageNode (dockerfile) {
  const version = imageNodeVersion(dockerfile)
  if (version === undefined) throw new Error(`no ARG NODE_IMAGE=node:<x.y.z>-... in ${dockerfile}`)
  if (process.version === `v${version}`) return { version, path: process.execPath }
  const pkg = `node-${process.platform}-${process.arch}`
  const dir = path.join(os.tmpdir(), `bench-${pkg}-${version}`)
  const bin = path.join(dir, 'node_modules', pkg, 'bin', 'node')
  if (!existsSync(bin)) {
    // Where the temporary directory is unusable (e.g. TMPDIR=/proc/nope), npm 11 hangs without a word when it cannot
    // create its --prefix, and so does Node 20's own mkdirSync(…, { recursive: true }): a plain mkdir fails at once.
    try {
      mkdirSync(dir)
    } catch (err) {
      if (err.code !== 'EEXIST') throw new Error(`cannot create ${dir} for Node ${version} (TMPDIR): ${err.message}`)
    }
    try {
      execFileSync('npm', ['install', '--prefix', dir, '--no-save', '--no-package-lock', '--no-audit', '--no-fund', '--loglevel=error', `${pkg}@${version}`],
        { stdio: ['ignore', 'ignore', 'pipe'], timeout: INSTALL_TIMEOUT_MS })
    } catch (err) {
      const why = err.code === 'ETIMEDOUT' ? `no answer within ${INSTALL_TIMEOUT_MS / 1000} s` : String(err.stderr ?? err.message).trim()
      throw new Error(`could not install Node ${version} (${pkg}@${version}) from the npm registry: ${why}`)
    }
  }
  const got = execFileSync(bin, ['--version'], { encoding: 'utf8' }).trim()
  if (got !== `v${version}`) throw new Error(`${bin} is ${got}, not v${version}`)
  return { version, path: bin }
}
