// Preloaded (`node --expose-gc --import mem-probe.mjs`) into the processes of
// the WebSocket memory run only. On SIGUSR2: two full GCs (when --expose-gc is
// on), then one stdout line {"benchMem":{rss,heapTotal,heapUsed,external,
// arrayBuffers,gc}} (bytes). The runner reads it; spawnProcess keeps these
// lines out of the log tail. Nothing else changes in the process.
// With BENCH_HEAP_SNAPSHOTS=<dir>, each reading also writes a heap snapshot
// there (<pid>-<n>.heapsnapshot; for finding what a connection holds).
import { writeHeapSnapshot } from 'node:v8'

let readings = 0
process.on('SIGUSR2', () => {
  const gc = typeof globalThis.gc === 'function'
  if (gc) {
    globalThis.gc()
    globalThis.gc()
  }
  const usage = process.memoryUsage()
  const dir = process.env.BENCH_HEAP_SNAPSHOTS
  if (dir) writeHeapSnapshot(`${dir}/${process.pid}-${++readings}.heapsnapshot`)
  process.stdout.write(JSON.stringify({ benchMem: { ...usage, gc } }) + '\n')
})
