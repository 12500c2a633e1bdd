"""Where audit lines go: `stdout`, `file:PATH` (JSON lines, appended) or `redis` (a stream).

A sink takes whole lines (each ends with a newline) in batches (`AuditLog` in audit.py batches
them). The redis sink lives with the store that owns the connection (gateway/store/redis_audit.py);
the store offers it through `TokenStore.audit_sink`, so nothing here picks a backend by type.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TextIO

from gateway.errors import ConfigError


class Sink(Protocol):
    def write(self, lines: list[str]) -> None:
        """Write whole lines (each ends with a newline), in order."""

    def close(self) -> None: ...


class StreamSink:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, lines: list[str]) -> None:
        self.stream.write("".join(lines))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class FileSink:
    """Appends to the file with one unbuffered write per batch (O_APPEND: lines from several
    processes writing the same file never interleave within a write)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = path.open("ab", buffering=0)

    def write(self, lines: list[str]) -> None:
        data = memoryview("".join(lines).encode("utf-8"))
        while data:
            written = self.handle.write(data)
            if not written:
                raise OSError(f"audit file {self.path}: a write made no progress")
            data = data[written:]

    def close(self) -> None:
        self.handle.close()


def file_sink_path(specs: Iterable[str], base_dir: Path) -> Path | None:
    """The file of the first `file:PATH` sink, resolved like the sink itself; None without one."""
    for spec in specs:
        if spec.startswith("file:"):
            raw = Path(spec[5:]).expanduser()
            return raw if raw.is_absolute() else base_dir / raw
    return None


def sinks_from_config(specs: Iterable[str], base_dir: Path, *,
                      redis_sink: Callable[[], Sink] | None = None) -> list[Sink]:
    """The sinks `audit.sinks` names; `redis_sink` makes the redis one (None: the store has no Redis)."""
    specs = list(specs)
    if "redis" in specs and redis_sink is None:
        raise ConfigError("audit.sinks: the redis sink writes to the Redis of store.url, which is not "
                          "a redis:// store; use stdout or file:PATH, or move the store to Redis")
    sinks: list[Sink] = []
    for spec in specs:
        if spec == "stdout":
            sinks.append(StreamSink(sys.stdout))
        elif spec.startswith("file:"):
            raw = Path(spec[5:]).expanduser()
            sinks.append(FileSink(raw if raw.is_absolute() else base_dir / raw))
        elif spec == "redis" and redis_sink is not None:
            sinks.append(redis_sink())
    return sinks
