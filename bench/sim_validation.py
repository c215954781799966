"""The simulator beside the live fleet, shape by shape: ``python bench/sim_validation.py``.

The same replay as tests/integration/test_sim_validation.py (tests/live_replay.py:
``fleet up`` with the local backend on the real Redis at 127.0.0.1:6379, under a key
prefix of its own, then ``autoscale.sim`` on the same trace and config), printed side
by side instead of asserted; ``--runs N`` repeats it to show the spread.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from tests import live_replay  # noqa: E402
from tests.conftest import REDIS_URL, Fleet, drop_prefix  # noqa: E402


def one_run() -> None:
    prefix = f"b{uuid.uuid4().hex[:10]}:"
    with tempfile.TemporaryDirectory(prefix="sim-validation-") as tmp:
        fleet = Fleet(Path(tmp), prefix, live_replay.overrides())
        began = time.monotonic()
        try:
            run = live_replay.run_live(fleet, live_replay.all_tasks(), live_replay.WINDOW,
                                       Path(tmp) / "work")
        finally:
            fleet.close()
            drop_prefix(redis.Redis.from_url(REDIS_URL), prefix)
        for comparison in live_replay.compare(run, fleet.config):
            print(live_replay.describe(comparison))
        print(f"(live run {time.monotonic() - began:.0f}s wall)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    for _ in range(parser.parse_args().runs):
        one_run()


if __name__ == "__main__":
    main()
