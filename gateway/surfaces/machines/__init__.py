"""The Fly Machines API surface (`/v1/...`, DESIGN sections 5 and 6)."""
