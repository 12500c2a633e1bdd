"""Dev mode and its sandbox upstream (`scopegate serve --dev`): for trying Scopegate, never production.

Production code never imports this package (tests/test_architecture.py checks); only the CLI's
`serve --dev` does, when asked.
"""
