// A minimal OIDC issuer laid out like a Keycloak realm:
//   issuer     http://127.0.0.1:<port>/realms/<BENCH_REALM>
//   discovery  ${issuer}/.well-known/openid-configuration
//   jwks_uri   ${issuer}/protocol/openid-connect/certs
//   /stats     {"discovery":n,"jwks":n}: how often the gateway fetched (should stay tiny)
// The signing key lives in the bench runner, which signs the tokens; this
// process only publishes the public JWKS it gets in BENCH_JWKS (JSON).
// Prints {"port":N,"issuer":"..."} on stdout once listening.
import http from 'node:http'

const realm = process.env.BENCH_REALM ?? 'bench'
const jwks = process.env.BENCH_JWKS
if (!jwks) {
  process.stderr.write('issuer: BENCH_JWKS is required\n')
  process.exit(1)
}
JSON.parse(jwks) // fail at start, not on the first fetch

const stats = { discovery: 0, jwks: 0 }
let issuer = ''
let discovery = ''

function send (res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'cache-control': 'no-store' })
  res.end(body)
}

const server = http.createServer((req, res) => {
  req.resume()
  const path = (req.url ?? '/').split('?')[0]
  if (req.method !== 'GET') return send(res, 405, '{"error":"method_not_allowed"}')
  if (path === `/realms/${realm}/.well-known/openid-configuration`) {
    stats.discovery++
    return send(res, 200, discovery)
  }
  if (path === `/realms/${realm}/protocol/openid-connect/certs`) {
    stats.jwks++
    return send(res, 200, jwks)
  }
  if (path === '/stats') return send(res, 200, JSON.stringify(stats))
  return send(res, 404, '{"error":"not_found"}')
})

server.listen(Number(process.env.BENCH_PORT ?? 0), '127.0.0.1', () => {
  const port = server.address().port
  issuer = `http://127.0.0.1:${port}/realms/${realm}`
  const oidc = `${issuer}/protocol/openid-connect`
  discovery = JSON.stringify({
    issuer,
    authorization_endpoint: `${oidc}/auth`,
    token_endpoint: `${oidc}/token`,
    userinfo_endpoint: `${oidc}/userinfo`,
    end_session_endpoint: `${oidc}/logout`,
    jwks_uri: `${oidc}/certs`,
    response_types_supported: ['code'],
    subject_types_supported: ['public'],
    id_token_signing_alg_values_supported: ['RS256'],
    grant_types_supported: ['authorization_code', 'client_credentials', 'refresh_token']
  })
  process.stdout.write(JSON.stringify({ port, issuer }) + '\n')
})
