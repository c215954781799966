"""How long a worker may take to stop, and what a platform lets it take.

Which signal starts which Celery shutdown (Celery 5.5; pinned with a real worker by
tests/faults/test_shutdown_signals.py):

- SIGTERM, once (what the kubelet and ``docker stop`` send): a **warm** shutdown. The
  worker takes no new task and waits for its running ones, however long they take:
  only their hard time limit bounds them. ``soft_shutdown_timeout`` plays no part.
- SIGQUIT, or a second SIGTERM/SIGINT: a **cold** shutdown, which with a
  ``soft_shutdown_timeout`` is first a **soft** one: running tasks get that many seconds,
  then the worker stops them and exits (an acks_late message comes back).

The kubelet sends one SIGTERM and, after terminationGracePeriodSeconds, SIGKILL: so the
grace is the longest task plus the worker's own exit, and no soft shutdown is budgeted.
Platforms cap how long they wait whatever the pod asks: Cluster Autoscaler gives a pod
at most ``--max-graceful-termination-sec`` (600 s by default) when it drains a node, so
a grace above that is cut short, killing a task in its last minutes.
"""

from __future__ import annotations

import math

from fleet.config_models import QueueClass

#: Seconds allowed for the last task of a queue with no hard time limit (Celery cannot
#: stop such a task; this bounds how long a scale-down may wait for it).
UNBOUNDED_TASK_SECONDS = 300
#: Seconds on top of the task bound: the worker's own exit (pool join, acks, withdrawing
#: its heartbeat) and the kubelet's signalling.
GRACE_MARGIN_SECONDS = 30
#: Cluster Autoscaler's default --max-graceful-termination-sec: a pod that needs longer
#: is marked so that it does not start an eviction it would cut short.
AUTOSCALER_GRACE_CAP = 600


def task_bound(q: QueueClass) -> float:
    """The longest a running task can take: the hard time limit, else an assumed bound.

    Without a hard limit (the threads pool cannot enforce one) a task may run forever;
    UNBOUNDED_TASK_SECONDS (or the soft limit, if longer) is what a scale-down waits.
    """
    if q.time_limit.hard is not None:
        return q.time_limit.hard
    return max(q.time_limit.soft or 0.0, UNBOUNDED_TASK_SECONDS)


def grace_period(q: QueueClass) -> int:
    """terminationGracePeriodSeconds = task bound + margin (see the module docstring:
    SIGTERM's warm shutdown waits for the running task, and nothing else)."""
    return math.ceil(task_bound(q) + GRACE_MARGIN_SECONDS)
