// The Node the container image runs (the Dockerfile's NODE_IMAGE), for bench
// rows that must measure the shipped runtime rather than the machine's Node:
// V8's tiers differ between releases (Node 22+ adds the Maglev compiler,
// which is what a cold process runs on in its first seconds). The npm
// registry ships the official binaries as node-<platform>-<arch>@<version>
// (bin/node, no install script); one copy is kept per version in the
// temporary directory.
import { execFileSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import os from 'node:os'
import path from 'node:path'

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
    try {
      execFileSync('npm', ['install', '--prefix', dir, '--no-save', '--no-package-lock', '--no-audit', '--no-fund', '--loglevel=error', `${pkg}@${version}`], { stdio: ['ignore', 'ignore', 'pipe'] })
    } catch (err) {
      throw new Error(`could not install Node ${version} (${pkg}@${version}) from the npm registry: ${String(err.stderr ?? err.message).trim()}`)
    }
  }
  const got = execFileSync(bin, ['--version'], { encoding: 'utf8' }).trim()
  if (got !== `v${version}`) throw new Error(`${bin} is ${got}, not v${version}`)
  return { version, path: bin }
}
