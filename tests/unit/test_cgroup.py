"""fleet.cgroup on the cgroup layouts a worker meets: real files in a temporary
directory laid out as /sys/fs/cgroup is under cgroup v2 and under v1.

The same readings inside a real container with --memory (and a real kernel OOM kill):
tests/containers/.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from fleet.cgroup import OomKills, cgroup_memory, memory_available, oom_kills

MiB = 1 << 20
#: What a v1 kernel writes into memory.limit_in_bytes when no limit is set (4 KiB pages).
V1_NO_LIMIT = "9223372036854771712"


def v2(root: Path, limit: str, current: int) -> Path:
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{current}\n")
    return root


def v1(root: Path, limit: str, usage: int) -> Path:
    memory = root / "memory"
    memory.mkdir()
    (memory / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (memory / "memory.usage_in_bytes").write_text(f"{usage}\n")
    return root


def near_host(value: int) -> bool:
    # The host's available moves between two reads; a limit's figure would be far off.
    return abs(value - psutil.virtual_memory().available) < 256 * MiB


def test_v2_limit_less_current(tmp_path: Path):
    root = v2(tmp_path, str(1536 * MiB), 100 * MiB)
    assert cgroup_memory(root) == (1536 * MiB, 100 * MiB)
    assert memory_available(root) == 1436 * MiB


def test_v2_max_is_no_limit(tmp_path: Path):
    root = v2(tmp_path, "max", 100 * MiB)
    assert cgroup_memory(root) is None
    assert near_host(memory_available(root))


def test_v1_limit_less_usage(tmp_path: Path):
    root = v1(tmp_path, str(1536 * MiB), 200 * MiB)
    assert cgroup_memory(root) == (1536 * MiB, 200 * MiB)
    assert memory_available(root) == 1336 * MiB


def test_v1_huge_limit_is_no_limit(tmp_path: Path):
    root = v1(tmp_path, V1_NO_LIMIT, 200 * MiB)
    assert cgroup_memory(root) is None
    assert near_host(memory_available(root))


def test_usage_over_the_limit_is_zero_not_negative(tmp_path: Path):
    # v1 usage counts page cache and may pass the limit for a moment before reclaim.
    root = v1(tmp_path, str(512 * MiB), 600 * MiB)
    assert memory_available(root) == 0


def test_a_limit_above_the_host_gives_the_host(tmp_path: Path):
    host_total = psutil.virtual_memory().total
    root = v2(tmp_path, str(4 * host_total), 0)
    assert near_host(memory_available(root))


@pytest.mark.parametrize("layout", ["none", "v2-garbage", "v1-missing-usage"])
def test_no_readable_cgroup_gives_the_host(tmp_path: Path, layout: str):
    if layout == "v2-garbage":
        v2(tmp_path, "lots", 0)
    elif layout == "v1-missing-usage":
        (tmp_path / "memory").mkdir()
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(512 * MiB))
    assert cgroup_memory(tmp_path) is None
    assert near_host(memory_available(tmp_path))


def test_this_machine_reads_without_error():
    # Whatever this machine is (v1 here), the default root gives a sane figure.
    assert 0 < memory_available() <= psutil.virtual_memory().total


def v2_events(root: Path, kills: int) -> None:
    (root / "memory.events").write_text(
        f"low 0\nhigh 0\nmax 12\noom 3\noom_kill {kills}\noom_group_kill 0\n")


def v1_oom_control(root: Path, kills: int) -> None:
    (root / "memory").mkdir(exist_ok=True)
    (root / "memory" / "memory.oom_control").write_text(
        f"oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n")


@pytest.mark.parametrize("layout", [v2_events, v1_oom_control])
def test_oom_kills_reads_both_layouts(tmp_path: Path, layout):
    layout(tmp_path, 4)
    assert oom_kills(tmp_path) == 4


def test_oom_kills_is_none_without_a_counter(tmp_path: Path):
    assert oom_kills(tmp_path) is None
    # A v1 kernel before 4.13 has memory.oom_control without the counter.
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert oom_kills(tmp_path) is None


def test_each_kill_is_claimed_once_and_none_before_it(tmp_path: Path):
    v1_oom_control(tmp_path, 2)  # two kills before this worker started: not its own
    counter = OomKills(tmp_path)
    assert counter.claim() is None
    v1_oom_control(tmp_path, 4)  # two children killed in one OOM
    assert counter.claim() == 4
    assert counter.claim() == 4
    assert counter.claim() is None  # a third lost child was not the kernel's doing


def test_no_counter_claims_nothing(tmp_path: Path):
    assert OomKills(tmp_path).claim() is None
