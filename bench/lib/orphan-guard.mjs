// Preloaded into every bench child (`node --import`): exit as soon as the
// bench runner is gone, even if it was SIGKILLed and could not clean up. A
// child whose parent dies is re-parented, so its ppid changes. The timer is
// unref'd and fires twice a second: no measurable cost.
const parent = process.ppid
setInterval(() => {
  if (process.ppid !== parent) process.exit(1)
}, 500).unref()
