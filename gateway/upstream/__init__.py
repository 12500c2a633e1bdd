"""Connections to the upstream APIs and the credential the gateway injects into them."""
