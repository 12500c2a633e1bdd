"""Audit records: one JSON object per line for every request and admin operation.

Records are built from names, never from token strings or the upstream credential: the only
token identifiers that appear are `jti`, `sub` and `token_name`. Sinks: `stdout` and
`file:PATH` (JSON lines, appended and flushed per record so a crash loses nothing written).
A sink that fails to write is reported on stderr once and does not stop the request: the
decision has been taken, and denying traffic because a disk filled up is an outage, not safety.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, TextIO

FIELDS = ("ts", "request_id", "jti", "sub", "token_name", "client_ip", "method", "path", "action", "app",
          "env", "decision", "reason", "status", "duration_ms", "upstream_ms")


class Sink(Protocol):
    def write(self, line: str) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, line: str) -> None:
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class FileSink:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = path.open("a", encoding="utf-8")

    def write(self, line: str) -> None:
        self.handle.write(line)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class AuditLog:
    def __init__(self, sinks: Iterable[Sink]) -> None:
        self.sinks = list(sinks)
        self._failed: set[int] = set()

    @classmethod
    def from_config(cls, specs: Iterable[str], base_dir: Path) -> AuditLog:
        sinks: list[Sink] = []
        for spec in specs:
            if spec == "stdout":
                sinks.append(StreamSink(sys.stdout))
            elif spec.startswith("file:"):
                raw = Path(spec[5:]).expanduser()
                sinks.append(FileSink(raw if raw.is_absolute() else base_dir / raw))
        return cls(sinks)

    def emit(self, record: dict[str, Any]) -> None:
        record.setdefault("ts", _now_rfc3339())
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        for index, sink in enumerate(self.sinks):
            try:
                sink.write(line)
            except (OSError, ValueError) as exc:
                if index not in self._failed:
                    self._failed.add(index)
                    print(f"scopegate: audit sink {index} failed: {exc.__class__.__name__}", file=sys.stderr)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _now_rfc3339() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
