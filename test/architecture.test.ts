// The shape of src/ stays readable: no import cycle between files, nor between folders (the pipeline's folders
// depend one way: config <- http <- auth <- limits <- proxy, with observability beside them and admin and app.ts at
// the end). Type-only imports count too: they show ownership just the same.
import { readdirSync, readFileSync, statSync } from 'node:fs'
import { dirname, join, normalize, relative } from 'node:path'
import { fileURLToPath } from 'node:url'
import t from 'tap'

const SRC = fileURLToPath(new URL('../src', import.meta.url))

function sources (dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f)
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : []
  })
}

type Graph = Map<string, Set<string>>

function addEdge (g: Graph, from: string, to: string): void {
  if (!g.has(from)) g.set(from, new Set())
  g.get(from)?.add(to)
}

/** Every cycle found by a depth-first walk, as "a -> b -> a". */
function cycles (g: Graph): string[] {
  const found: string[] = []
  const state = new Map<string, 'open' | 'done'>()
  const stack: string[] = []
  const visit = (n: string): void => {
    state.set(n, 'open')
    stack.push(n)
    for (const m of g.get(n) ?? []) {
      if (state.get(m) === 'open') found.push([...stack.slice(stack.indexOf(m)), m].join(' -> '))
      else if (!state.has(m)) visit(m)
    }
    stack.pop()
    state.set(n, 'done')
  }
  for (const n of g.keys()) if (!state.has(n)) visit(n)
  return found
}

const fileGraph: Graph = new Map()
const folderGraph: Graph = new Map()
/** A file at the top of src/ is its own node; anything deeper belongs to its folder. */
const nodeOf = (file: string): string => relative(SRC, dirname(file)) || relative(SRC, file)
for (const file of sources(SRC)) {
  for (const m of readFileSync(file, 'utf8').matchAll(/^(?:import|export)\s[^'"]*?from\s+'(\.[^']+)'/gm)) {
    const target = normalize(join(dirname(file), (m[1] as string).replace(/\.js$/, '.ts')))
    addEdge(fileGraph, relative(SRC, file), relative(SRC, target))
    if (nodeOf(file) !== nodeOf(target)) addEdge(folderGraph, nodeOf(file), nodeOf(target))
  }
}

t.test('src has no import cycle between files', async (t) => {
  t.ok(fileGraph.size > 20, `imports were found (${fileGraph.size} files import others)`)
  t.same(cycles(fileGraph), [])
})

t.test('src has no import cycle between folders', async (t) => {
  t.ok(folderGraph.size > 5, `folders import each other (${folderGraph.size})`)
  t.same(cycles(folderGraph), [])
})

t.test('the cycle finder finds a cycle', async (t) => {
  const g: Graph = new Map()
  addEdge(g, 'a', 'b')
  addEdge(g, 'b', 'c')
  addEdge(g, 'c', 'a')
  t.same(cycles(g), ['a -> b -> c -> a'])
})
