"""The OpenAPI 3.0 document of the gateway's admin API (`GET /_gateway/v1/openapi.json`)."""

from __future__ import annotations

from typing import Any

from gateway import __version__


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_ERRORS = {"400": _error("Malformed request; the message names the field"),
           "401": _error("Missing, malformed, expired or revoked token"),
           "403": _error("The token may not do this"),
           "503": _error("The token store is unreachable")}


def _json(ref: str, description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}


_JTI = {"name": "jti", "in": "path", "required": True, "schema": {"type": "string"}}
_DURATION = {"oneOf": [{"type": "string", "example": "1h", "pattern": "^[0-9]+[smhdw]?$"},
                       {"type": "integer", "minimum": 1}]}


def admin_openapi() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Scopegate admin API", "version": __version__,
                 "description": "Token administration for the Scopegate gateway. Authorize with "
                                "`Authorization: Bearer sgt_...` carrying token-admin@gateway."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/_gateway/v1/tokens": {
                "post": {"operationId": "mintToken", "summary": "Mint a token", "requestBody": _body("MintRequest"),
                         "responses": {"201": _json("MintedToken", "The token (shown once) and its record"),
                                       **_ERRORS}},
                "get": {"operationId": "listTokens", "summary": "List token records (never token strings)",
                        "description": "Filters combine (all must hold); an unknown query parameter is a 400.",
                        "parameters": [
                            {"name": "active", "in": "query", "schema": {"type": "boolean"},
                             "description": "same as state=active"},
                            {"name": "state", "in": "query",
                             "schema": {"type": "string", "enum": ["active", "revoked", "expired"]}},
                            {"name": "grant", "in": "query", "schema": {"type": "string"},
                             "description": "tokens carrying exactly this grant, e.g. deployer@app:web"},
                            {"name": "app", "in": "query", "schema": {"type": "string"},
                             "description": "tokens whose grants cover this app (env: grants by its environment)"},
                            {"name": "subject", "in": "query", "schema": {"type": "string"},
                             "description": "tokens of this subject, or a glob of it (ci:github:acme/*)"}],
                        "responses": {"200": _json("TokenList", "Records"), **_ERRORS}},
            },
            "/_gateway/v1/tokens/{jti}": {
                "get": {"operationId": "showToken", "parameters": [_JTI],
                        "responses": {"200": _json("TokenRecord", "The record"),
                                      "404": _error("No such token"), **_ERRORS}},
                "delete": {"operationId": "revokeToken", "summary": "Revoke a token and its descendants",
                           "parameters": [_JTI, {"name": "reason", "in": "query", "schema": {"type": "string"}}],
                           "responses": {"204": {"description": "Revoked"}, "404": _error("No such token"),
                                         **_ERRORS}},
            },
            "/_gateway/v1/tokens/{jti}/rotate": {
                "post": {"operationId": "rotateToken", "parameters": [_JTI],
                         "requestBody": {"required": False, "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/RotateRequest"}}}},
                         "responses": {"201": _json("MintedToken", "The replacement token"),
                                       "404": _error("No such token"),
                                       "422": _error("The token is revoked or expired; mint a new one"), **_ERRORS}},
            },
            "/_gateway/v1/token/self": {
                "get": {"operationId": "tokenSelf",
                        "summary": "The caller's own token: record, state and what its grants may do (any valid "
                                   "token; never the token string)",
                        "responses": {"200": _json("TokenSelf", "The caller's token"), **_ERRORS}},
            },
            "/_gateway/v1/token/attenuate": {
                "post": {"operationId": "attenuateToken", "summary": "Narrow the caller's own token",
                         "requestBody": _body("AttenuateRequest"),
                         "responses": {"201": _json("MintedToken", "The child token"), **_ERRORS}},
            },
            "/_gateway/v1/token/exchange": {
                "post": {"operationId": "exchangeToken", "security": [],
                         "summary": "RFC 8693: a CI OIDC id token -> a short-lived scoped token (per oidc.trust)",
                         "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {
                             "schema": {"$ref": "#/components/schemas/TokenExchangeRequest"}}}},
                         "responses": {
                             "200": _json("TokenExchangeResponse", "The gateway token (Cache-Control: no-store)"),
                             "400": _json("OAuthError", "invalid_request, unsupported_grant_type, invalid_target "
                                                        "or invalid_scope"),
                             "401": _json("OAuthError", "invalid_grant: the id token is refused (signature, "
                                                        "issuer, audience, times, claims, replay)"),
                             "503": _json("OAuthError", "temporarily_unavailable: the issuer's keys or the "
                                                        "store cannot be reached (Retry-After)")}},
            },
            "/_gateway/v1/audit": {
                "get": {"operationId": "readAudit",
                        "summary": "Recent audit records, oldest first: the file sink's, else this process's "
                                   "last 10,000 in memory (`source` says which)",
                        "parameters": [
                            {"name": "since", "in": "query", "schema": {"type": "string", "example": "1h"},
                             "description": "an RFC 3339 time or a duration ago (90s, 15m, 1h, 30d)"},
                            {"name": "app", "in": "query", "schema": {"type": "string", "example": "web-*"},
                             "description": "app name or glob"},
                            {"name": "decision", "in": "query", "schema": {"type": "string",
                                                                          "enum": ["allow", "deny"]}},
                            {"name": "token", "in": "query", "schema": {"type": "string"},
                             "description": "a token's jti or name"},
                            {"name": "limit", "in": "query",
                             "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100},
                             "description": "the newest this many matching records"}],
                        "responses": {"200": _json("AuditRecords", "The matching records"), **_ERRORS}},
            },
            "/_gateway/v1/explain": {
                "post": {"operationId": "explain", "summary": "Dry-run a request",
                         "description": "The request path's decision, body constraints included, for the caller's "
                                        "own token or some of its grants; another token or other grants need "
                                        "token-admin@gateway (403 otherwise).",
                         "requestBody": _body("ExplainRequest"),
                         "responses": {"200": _json("Explanation", "The decision and why"),
                                       "422": _error("The token to explain is malformed, expired or revoked"),
                                       **_ERRORS}},
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string"}, "message": {"type": "string"}, "request_id": {"type": "string"}}},
                "MintRequest": {"type": "object", "required": ["grants"], "additionalProperties": False,
                                "properties": {"grants": {"type": "array", "minItems": 1,
                                                          "items": {"type": "string", "example": "viewer@app:web"}},
                                               "ttl": _DURATION, "name": {"type": "string"},
                                               "subject": {"type": "string"}}},
                "RotateRequest": {"type": "object", "additionalProperties": False,
                                  "properties": {"grace": _DURATION}},
                "AttenuateRequest": {"type": "object", "required": ["grants"], "additionalProperties": False,
                                     "properties": {"grants": {"type": "array", "minItems": 1,
                                                               "items": {"type": "string"}},
                                                    "ttl": _DURATION, "name": {"type": "string"}}},
                "TokenExchangeRequest": {
                    "type": "object", "required": ["grant_type", "subject_token", "subject_token_type"],
                    "properties": {
                        "grant_type": {"type": "string",
                                       "enum": ["urn:ietf:params:oauth:grant-type:token-exchange"]},
                        "subject_token": {"type": "string", "description": "the CI platform's OIDC id token"},
                        "subject_token_type": {"type": "string",
                                               "enum": ["urn:ietf:params:oauth:token-type:id_token",
                                                        "urn:ietf:params:oauth:token-type:jwt"]},
                        "requested_token_type": {"type": "string",
                                                 "enum": ["urn:ietf:params:oauth:token-type:access_token"]},
                        "audience": {"type": "string", "description": "if given, the gateway's tokens.audience"},
                        "scope": {"type": "string",
                                  "description": "space-separated grants: a subset of what the rules allow"}}},
                "TokenExchangeResponse": {
                    "type": "object", "required": ["access_token", "issued_token_type", "token_type", "expires_in"],
                    "properties": {"access_token": {"type": "string", "example": "sgt_eyJhbGci..."},
                                   "issued_token_type": {"type": "string",
                                                         "enum": ["urn:ietf:params:oauth:token-type:access_token"]},
                                   "token_type": {"type": "string", "enum": ["Bearer"]},
                                   "expires_in": {"type": "integer"}, "scope": {"type": "string"}}},
                "OAuthError": {"type": "object", "required": ["error"], "properties": {
                    "error": {"type": "string", "enum": ["invalid_request", "invalid_grant", "invalid_target",
                                                         "invalid_scope", "unsupported_grant_type",
                                                         "temporarily_unavailable", "server_error"]},
                    "error_description": {"type": "string"}}},
                "ExplainRequest": {"type": "object", "required": ["method", "path"], "additionalProperties": False,
                                   "properties": {"method": {"type": "string"}, "path": {"type": "string"},
                                                  "body": {}, "grants": {"type": "array", "items": {"type": "string"}},
                                                  "token": {"type": "string"}}},
                "TokenRecord": {"type": "object", "required": ["jti", "sub", "name", "grants", "iat", "exp"],
                                "properties": {
                                    "jti": {"type": "string"}, "sub": {"type": "string"}, "name": {"type": "string"},
                                    "grants": {"type": "array", "items": {"type": "string"}},
                                    "iat": {"type": "integer"}, "exp": {"type": "integer"},
                                    "parent": {"type": "string", "nullable": True},
                                    "revoked_at": {"type": "integer", "nullable": True},
                                    "revoked_reason": {"type": "string", "nullable": True},
                                    "last_used_at": {"type": "integer", "nullable": True}}},
                "MintedToken": {"allOf": [{"$ref": "#/components/schemas/TokenRecord"},
                                          {"type": "object", "required": ["token"],
                                           "properties": {"token": {"type": "string"}}}]},
                "TokenList": {"type": "object", "required": ["tokens"], "properties": {
                    "tokens": {"type": "array", "items": {"$ref": "#/components/schemas/TokenRecord"}},
                    "filters": {"type": "object", "additionalProperties": {"type": "string"},
                                "description": "the filters applied, by name"}}},
                "TokenSelf": {"allOf": [{"$ref": "#/components/schemas/TokenRecord"}, {
                    "type": "object", "required": ["state", "may"], "properties": {
                        "state": {"type": "string", "enum": ["active", "revoked", "expired"]},
                        "may": {"type": "array", "items": {"type": "object", "properties": {
                            "grant": {"type": "string"}, "env": {"type": "string", "nullable": True},
                            "actions": {"type": "array", "items": {"type": "string"}}}}}}}]},
                "AuditRecords": {"type": "object", "required": ["records", "source"], "properties": {
                    "records": {"type": "array", "items": {"type": "object", "description": "one audit record: "
                                "ts, request_id, jti, sub, token_name, client_ip, method, path, action, app, env, "
                                "decision, reason, status, duration_ms, upstream_ms"}},
                    "source": {"type": "string", "enum": ["file", "memory"]}, "note": {"type": "string"}}},
                "Explanation": {"type": "object", "required": ["allowed", "reason"], "properties": {
                    "allowed": {"type": "boolean"}, "status": {"type": "integer"},
                    "error": {"type": "string", "nullable": True}, "reason": {"type": "string"},
                    "method": {"type": "string"}, "path": {"type": "string"},
                    "operation": {"type": "string", "nullable": True}, "action": {"type": "string", "nullable": True},
                    "app": {"type": "string", "nullable": True}, "env": {"type": "string", "nullable": True},
                    "grant": {"type": "string", "nullable": True},
                    "rule": {"type": "array", "items": {"type": "string"}},
                    "constraints": {"type": "array", "items": {"type": "string"}},
                    "constraint": {"type": "string", "nullable": True}}},
            },
        },
    }
