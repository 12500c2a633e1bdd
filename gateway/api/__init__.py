"""The gateway's own HTTP API under `/_gateway/` and `/.well-known/` (DESIGN section 8): never forwarded."""
