// Prints the README configuration table, generated from src/config/settings.ts (via dist/).
// Usage: npm run build && node scripts/config-table.mjs
import { configTable } from '../dist/config/reference.js'

console.log(configTable())
