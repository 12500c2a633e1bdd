"""`scopegate serve`: the gateway on the configured address (one process, or `--workers N`)."""

from __future__ import annotations

import argparse
import os
import sys

from gateway.app import GatewayApp
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.server import bind, bind_workers, serve, serve_workers
from gateway.services import Services


def run_server(config: Config, args: argparse.Namespace) -> int:
    host = args.host or config.server_host
    port = config.server_port if args.port is None else args.port
    if args.workers > 1:
        if config.source == "(defaults)":
            raise ConfigError("--workers needs a config file (--config or SCOPEGATE_CONFIG) that every worker reads")
        Services.build(config).audit.close()  # check the whole configuration once, before forking
        os.environ["SCOPEGATE_CONFIG"] = config.source
        sockets = bind_workers(host, port, args.workers)
        print(f"scopegate listening on http://{host}:{sockets[0].getsockname()[1]} -> {config.upstream_url} "
              f"({args.workers} workers)", file=sys.stderr, flush=True)
        serve_workers(sockets)
        return 0
    services = Services.build(config)
    sock = bind(host, port)
    print(f"scopegate listening on http://{host}:{sock.getsockname()[1]} -> {config.upstream_url}",
          file=sys.stderr, flush=True)
    serve(GatewayApp(services), sock)
    return 0
