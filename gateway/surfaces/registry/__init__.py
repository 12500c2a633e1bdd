"""The image registry surface: the Distribution (OCI) HTTP API at `/v2/...`, one repository per app."""
