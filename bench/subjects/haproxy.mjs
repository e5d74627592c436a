// The C peer for the HTTP table: HAProxy's own JWT path, as HAProxy's blog
// ("Verify OAuth JWT tokens with HAProxy") and the 2.6 docs configure it:
//   jwt_verify RS256 against the issuer's public key (PEM file, loaded at start),
//   alg / iss / aud / exp checks on the claims, a per-`sub` stick table that
//   counts http_req_rate with a deny rule (the limit never trips in the bench,
//   like the gateway's), client X-User-Sub removed and set from the token.
// One thread (the subject core is one CPU), keep-alive both sides, no logging.
// It checks less than the gateway (no kid lookup, no JWKS, no nbf, no token
// type, no revocation, no audit line, no metrics) and its stick table is per
// process, not shared by replicas. Used by bench/run.mjs (subject `haproxy`).

/** Answered by HAProxy itself (monitor-uri), before any rule: readiness. */
export const HAPROXY_HEALTH = '/haproxy-health'

/**
 * @param {{ port: number, upstream: string, issuer: string, audience: string, pem: string }} o
 */
export function haproxyConfig ({ port, upstream, issuer, audience, pem }) {
  const app = new URL(upstream)
  for (const [name, v] of Object.entries({ issuer, audience, pem })) {
    if (/[\s"'#]/.test(v)) throw new Error(`haproxy config: ${name} must not contain spaces, quotes or #: ${v}`)
  }
  return `# written by bench/subjects/haproxy.mjs for one bench run
global
  nbthread 1
  maxconn 4096

defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
  option http-keep-alive

frontend gateway
  bind 127.0.0.1:${port}
  monitor-uri ${HAPROXY_HEALTH}
  http-request del-header x-user-sub
  http-request deny deny_status 401 unless { http_auth_bearer -m found }
  http-request set-var(txn.alg) http_auth_bearer,jwt_header_query('$.alg')
  http-request set-var(txn.iss) http_auth_bearer,jwt_payload_query('$.iss')
  http-request set-var(txn.aud) http_auth_bearer,jwt_payload_query('$.aud')
  http-request set-var(txn.exp) http_auth_bearer,jwt_payload_query('$.exp','int')
  http-request set-var(txn.sub) http_auth_bearer,jwt_payload_query('$.sub')
  http-request deny deny_status 401 unless { var(txn.alg) -m str RS256 }
  http-request deny deny_status 401 unless { var(txn.iss) -m str ${issuer} }
  http-request deny deny_status 401 unless { var(txn.aud) -m str ${audience} }
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 if { var(txn.exp),sub(txn.now) -m int lt 0 }
  http-request deny deny_status 401 unless { http_auth_bearer,jwt_verify(txn.alg,"${pem}") -m int 1 }
  http-request track-sc0 var(txn.sub) table per_sub
  http-request deny deny_status 429 if { sc_http_req_rate(0) gt 1000000000 }
  http-request set-header X-User-Sub %[var(txn.sub)]
  default_backend app

backend per_sub
  stick-table type string len 64 size 100k expire 60s store http_req_rate(60s)

backend app
  server app ${app.hostname}:${app.port}
`
}
