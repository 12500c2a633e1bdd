"""The `scopegate` command line: serve, init and token administration (local mode)."""
