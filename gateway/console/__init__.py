"""The web console under `/_gateway/ui/` (DESIGN section 16, docs/console.md).

Server-rendered pages (Jinja2, autoescaped) and a little plain JavaScript served from this
package, over the same registry, store, policy and request frame as the admin API: a console
action is decided, done and audited exactly as its `/_gateway/v1/` twin.
"""
