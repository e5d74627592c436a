/**
 * WebSocket close codes (RFC 6455 §7.4.1): the ones the gateway sends, and
 * which codes a peer may put in a close frame. Protocol facts only, so the
 * proxy, auth and limits code that closes sessions all import them from here.
 */

/** Close codes the gateway sends. */
export const CLOSE = {
  normal: 1000,
  goingAway: 1001,
  policy: 1008,
  tooBig: 1009,
  tryAgainLater: 1013,
  badGateway: 1014
} as const

/** Codes a peer may legally send in a close frame. */
export function sendable (code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999)
}
