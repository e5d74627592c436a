// Preloaded into the demo's children (`node --import`): when `npm run demo` is gone without stopping them (SIGKILL,
// a crash), the child is re-parented, its ppid changes, and it stops itself: SIGTERM first (the gateway drains),
// exit after 3 s at the latest. Checked twice a second on an unref'd timer.
const parent = process.ppid
setInterval(() => {
  if (process.ppid === parent) return
  process.kill(process.pid, 'SIGTERM')
  setTimeout(() => process.exit(1), 3000).unref()
}, 500).unref()
