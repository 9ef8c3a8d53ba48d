// Sends the calls given as JSON on stdin with the official @segment/analytics-node client, unchanged but for its
// host. Usage: node send.mjs <host> <writeKey> < calls.json   where calls.json is [{"method": "track", "params": {...}}, ...]
import { Analytics } from '@segment/analytics-node'

const [host, writeKey] = process.argv.slice(2)
const calls = JSON.parse(await new Promise((resolve) => {
  let data = ''
  process.stdin.on('data', (chunk) => { data += chunk })
  process.stdin.on('end', () => resolve(data))
}))
const analytics = new Analytics({ writeKey, host, flushAt: 50, flushInterval: 200 })
const failures = []
analytics.on('error', (err) => failures.push(String(err && (err.reason || err.message || err.code) || err)))
for (const { method, params } of calls) {
  analytics[method](params)
}
await analytics.closeAndFlush({ timeout: 20000 })
if (failures.length) {
  console.error(JSON.stringify(failures))
  process.exit(1)
}
console.log(JSON.stringify({ sent: calls.length }))
