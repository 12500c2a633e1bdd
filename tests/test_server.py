"""gateway/server.py: what a serving process does before it serves."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

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
print(before, after, len(gc.get_objects(generation=0)) < after, gc.get_freeze_count() == after)
"""


def test_freeze_startup_heap_takes_what_is_loaded_out_of_collections() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    before, after, young_is_small, later_not_frozen = result.stdout.split()
    assert int(before) == 0
    assert int(after) > 1000  # the modules, the app's classes and the kept lists
    assert young_is_small == "True" and later_not_frozen == "True"
