/**
 * The gateway's own endpoints on the public listener (the back-channel logout
 * endpoint): routes with this config are answered by the gateway itself, are
 * never proxied, need no bearer token and have no per-user limit; auth and
 * limits let them through by this mark.
 */
import type { FastifyRequest } from 'fastify'

export const OWN_ROUTE = { gatewayOwn: true } as const

export function isOwnRoute (request: FastifyRequest): boolean {
  return (request.routeOptions.config as { gatewayOwn?: boolean } | undefined)?.gatewayOwn === true
}
