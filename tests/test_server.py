"""gateway/server.py: what a serving process does before it serves."""

from __future__ import annotations

import gc
import subprocess
import sys

from tests.conftest import REPO, RunningGateway
from tests.servers import raw_request

# In a fresh interpreter: freezing the test process's own heap would hide its garbage from the
# collector for the rest of the run.
PROBE = """
import gc, sys
from gateway.app import GatewayApp  # what a serving process has loaded by then
from gateway.server import freeze_startup_heap
kept = [[object()] for _ in range(1000)]  # tracked containers, alive past startup
before = gc.get_freeze_count()
freeze_startup_heap()
after = gc.get_freeze_count()
new = [[object()] for _ in range(10)]
print(before, after, len(gc.get_objects(generation=0)) < after, gc.get_freeze_count() == after,
      ",".join(map(str, gc.get_threshold())))
"""


def test_freeze_startup_heap_takes_what_is_loaded_out_of_collections() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    before, after, young_is_small, later_not_frozen, thresholds = result.stdout.split()
    assert int(before) == 0
    assert int(after) > 1000  # the modules, the app's classes and the kept lists
    assert young_is_small == "True" and later_not_frozen == "True"
    assert thresholds == "10000,10,10"  # the youngest generation collected less often, the older as before


def test_proxied_requests_leave_no_cyclic_garbage(gateway: RunningGateway) -> None:
    """What `GC_YOUNG_THRESHOLD` relies on: allowed, denied and unauthenticated requests are freed
    by reference counting alone, so rarer collections of the youngest generation let nothing pile
    up. gc.DEBUG_SAVEALL keeps whatever a collection finds unreachable, in this process (the
    gateway and its upstream serve in threads here)."""
    token = gateway.mint("deployer@app:web-staging", name="gc-probe")
    requests = [
        f"GET /v1/apps/web-staging/machines HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {token}\r\n\r\n",
        f"GET /v1/apps/web-prod/machines HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {token}\r\n\r\n",
        "GET /v1/apps/web-staging/machines HTTP/1.1\r\nhost: gw\r\n\r\n",
        f"POST /v1/apps/web-staging/machines/m1/stop HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {token}\r\n"
        "content-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    ]
    statuses = [raw_request(gateway.port, r.encode())[0] for r in requests]  # warm every path
    assert statuses == [200, 403, 401, 200]
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(25):
            for text in requests:
                raw_request(gateway.port, text.encode())
        gc.collect()
        found = sorted({type(o).__qualname__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert found == []
