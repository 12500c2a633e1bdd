"""The decision core: tokens, grants, environments, Casbin policy, constraints, rate limits, audit.

It knows nothing about HTTP (no starlette, aiohttp or uvicorn; tests/test_architecture.py checks):
a surface hands it a verified credential and the `(app, action)` checks a request needs, and it
answers allowed or denied, why, and at what rate. docs/architecture.md draws the seam.
"""
