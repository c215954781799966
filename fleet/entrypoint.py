"""The ``fleet`` command's first lines: a container's PID 1 must not drop a SIGTERM.

The kernel gives PID 1 no default signal actions: a SIGTERM before a handler is set is
ignored. In a container whose command is ``fleet`` (the image's entrypoint), a stop
sent while the worker was still importing (a scale-down right after a scale-up, a
rollout) was lost, and the engine or the kubelet waited out the whole grace period
(heavy: 116 s; 750 s on Kubernetes) before its SIGKILL. So, before anything is
imported, PID 1 exits on SIGTERM; Celery's own handler (warm shutdown) and the CLI's
replace this one once they are set, before any task can run.
"""

from __future__ import annotations

import os
import signal


def main() -> None:
    if os.getpid() == 1:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
    from fleet.cli import main as cli_main

    cli_main()
