"""Fly's REST API surface (`/api/v1/...`, DESIGN section 15): organizations, builds, releases, logs."""
