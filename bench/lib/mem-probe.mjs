// Preloaded (`node --expose-gc --import mem-probe.mjs`) into the processes of
// the WebSocket memory run only. On SIGUSR2: two full GCs (when --expose-gc is
// on), then one stdout line {"benchMem":{rss,heapTotal,heapUsed,external,
// arrayBuffers,gc}} (bytes). The runner reads it; spawnProcess keeps these
// lines out of the log tail. Nothing else changes in the process.
process.on('SIGUSR2', () => {
  const gc = typeof globalThis.gc === 'function'
  if (gc) {
    globalThis.gc()
    globalThis.gc()
  }
  process.stdout.write(JSON.stringify({ benchMem: { ...process.memoryUsage(), gc } }) + '\n')
})
