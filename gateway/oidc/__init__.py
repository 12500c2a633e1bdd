"""Keyless CI: OIDC id tokens of CI platforms exchanged for short-lived gateway tokens (RFC 8693).

`exchange.py` checks a subject token and mints; `rules.py` holds the trust rules and claim checks;
`keys.py` fetches and caches the issuers' signing keys; `errors.py` the RFC 6749 refusals.
"""
