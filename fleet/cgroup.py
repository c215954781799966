"""The container's memory cgroup as the kernel keeps it: its limit, its usage, and how
often its OOM killer struck.

Why read the cgroup at all: a pod's processes see the node's memory in /proc/meminfo,
and the engine's ``OOMKilled`` (Docker's, the kubelet's) is reported only for a container
that exited. When the kernel kills a pool child of a worker whose main process stays
up, the worker sees a plain lost child; only the cgroup's counter says it was memory
(fleet.guard).

``root`` is where the cgroup is mounted; inside a container it is the container's own.
cgroup v2 keeps everything at the top; v1 in a ``memory/`` hierarchy. Many nodes still
run v1 (CI's machines do: docs/docker.md).
"""

from __future__ import annotations

import threading
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")

#: cgroup v1 writes "no limit" as the largest page multiple a signed 64-bit counter holds
#: (9223372036854771712 with 4 KiB pages), not as a word; nothing real comes near 2**62.
V1_UNLIMITED = 1 << 62


def cgroup_memory(root: Path = CGROUP_ROOT) -> tuple[int, int] | None:
    """(limit, usage) in bytes of the memory cgroup mounted at ``root``, or None when it
    sets no limit or there is none. Inside a container ``root`` is the container's own
    cgroup. cgroup v2 has ``memory.max`` ("max": none) and ``memory.current`` at the top;
    v1 has a ``memory/`` hierarchy with ``memory.limit_in_bytes`` and
    ``memory.usage_in_bytes``. Many nodes still run v1 (CI's machines do: docs/docker.md)."""
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit), int((root / "memory.current").read_text())
    except FileNotFoundError:
        pass  # not v2: try v1
    except (OSError, ValueError):
        return None
    v1 = root / "memory"
    try:
        limit_v1 = int((v1 / "memory.limit_in_bytes").read_text())
        usage = int((v1 / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return None
    if limit_v1 >= V1_UNLIMITED:
        return None
    return limit_v1, usage


def memory_available(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Bytes this process's container may still use: the cgroup's limit less its usage
    if a limit is set (a pod sees the node's memory in /proc/meminfo), else the host's
    available. Usage counts page cache (v1 and v2 alike), which the kernel reclaims
    before it kills for memory: the figure is a lower bound."""
    host = psutil.virtual_memory().available
    found = cgroup_memory(cgroup_root)
    if found is None:
        return host
    limit, usage = found
    return max(0, min(host, limit - usage))


def oom_kills(root: Path = CGROUP_ROOT) -> int | None:
    """How many processes the kernel's OOM killer has killed in this memory cgroup
    (v2 ``memory.events`` "oom_kill"; v1 ``memory.oom_control`` "oom_kill", kernels
    4.13 and later), or None where no such counter can be read."""
    for path in (root / "memory.events", root / "memory" / "memory.oom_control"):
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                try:
                    return int(value)
                except ValueError:
                    return None
    return None


class OomKills:
    """Attributes the cgroup's OOM kills to lost pool processes, one kill to each.

    The kernel counts a kill when it picks its victim, before the process is gone, so
    by the time the worker notices a child lost to SIGKILL the count has moved. A kill
    of some other process in the container (a task's own subprocess) leaves a count
    that no lost child claims; the next child lost to SIGKILL claims it. That errs
    toward calling a kill memory, which ends the task's deliveries sooner, never later.
    """

    def __init__(self, root: Path = CGROUP_ROOT):
        self.root = root
        self._lock = threading.Lock()
        self._claimed = oom_kills(root)

    def claim(self) -> int | None:
        """The counter's value if a kill is left unclaimed (and claim it), else None."""
        with self._lock:
            now = oom_kills(self.root)
            if now is None or self._claimed is None or now <= self._claimed:
                if now is not None and self._claimed is None:
                    self._claimed = now
                return None
            self._claimed += 1
            return now

    def limit(self) -> int | None:
        found = cgroup_memory(self.root)
        return None if found is None else found[0]
