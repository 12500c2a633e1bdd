"""Contract tests: the gateway against the real Fly Machines spec (Prism) and a real third-party client."""
