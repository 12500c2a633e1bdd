"""API surfaces: one package per upstream API the gateway fronts (the Machines API first).

A surface knows one API's wire shape: how a request turns into the `(app, action)` checks the
decision core answers, how an allowed request is forwarded, and how an answer is filtered. The
modules at this level are shared by every surface (request-target canonicalization, route maps,
HTTP plumbing). docs/architecture.md says how to add one.
"""
