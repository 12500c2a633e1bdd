"""Fly's GraphQL API surface (`POST /graphql`, DESIGN section 15); docs/graphql.md explains the rules."""
