"""Fleet-wide rate limits: the Redis token bucket, and real workers sharing it.

The bucket tests run against the real Redis under the test's prefix. The worker tests
start two real ``fleet worker --queue default`` processes and record, inside each task,
when it started (tests/probe_rate.py).

How start times are judged. A granted take reserves a start time ``s`` (Redis time plus
the wait); reservations satisfy ``count in [a, b] <= burst + rate * (b - a)`` with
burst = capacity = 1. The probe records ``t = s + d`` where ``d >= 0`` is the delay
between the reserved moment and the probe's ``time.time()`` (reply latency, oversleep,
scheduling; one machine, one clock). With ``d <= D`` the recorded starts in any window
are at most ``burst + rate * (b - a + D)``, hence the slack ``rate * D`` below, with D =
1.5 s: generous for two busy cores (observed: well under 0.1 s with six busy loops on
two cores). Load delays starts and spreads them out; only a record lagging its own
reservation by more than D could break the bound. The control run shows the same check
fails by about ten tasks when each worker limits only itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import pytest
import redis

from fleet.ratelimit import Grant, TokenBucket, max_wait_for
from tests import probe_rate
from tests.conftest import REDIS_URL, ROOT, shipped_config, wait_for

#: Largest delay between a reserved start and the probe recording it (see above).
RECORD_DELAY = 1.5
#: Float noise in the bucket's arithmetic (Lua prints numbers with 14 digits).
EPS = 1e-6


def window_excess(times: list[float], per_second: float, burst: float = 1.0) -> float:
    """The most starts any window [t_i, t_j] holds beyond ``burst + rate * length``."""
    ts = sorted(times)
    worst = float("-inf")
    for i in range(len(ts)):
        for j in range(i, len(ts)):
            worst = max(worst, (j - i + 1) - burst - per_second * (ts[j] - ts[i]))
    return worst


# --- the bucket itself, against the real Redis ------------------------------------------


def test_first_take_is_granted_at_once(redis_client, prefix):
    bucket = TokenBucket(redis_client, prefix + "bucket", per_second=1.0)
    assert bucket.take() == Grant(True, 0.0)


def test_successive_takes_are_spaced_one_interval_apart(redis_client, prefix):
    rate = 5.0
    bucket = TokenBucket(redis_client, prefix + "bucket", per_second=rate)
    begin = time.monotonic()
    grants = [bucket.take(max_wait=5.0) for _ in range(6)]
    elapsed = time.monotonic() - begin
    assert all(g.granted for g in grants), grants
    for k, grant in enumerate(grants):
        # Take k finds the bucket k tokens short, minus what refilled since the first.
        assert k / rate - elapsed - EPS <= grant.wait <= k / rate + EPS, (k, grants)


def test_a_take_over_max_wait_is_refused_and_consumes_nothing(redis_client, prefix):
    rate = 0.5  # a token every 2 s: the refusals below hold unless the test stalls 1.5 s
    bucket = TokenBucket(redis_client, prefix + "bucket", per_second=rate)
    begin = time.monotonic()
    assert bucket.take().granted
    for _ in range(3):
        refused = bucket.take(max_wait=0.5)
        assert not refused.granted, refused
        assert 0.5 < refused.wait <= 2.0 + EPS  # come back when the next token is due
    granted = bucket.take(max_wait=5.0)
    elapsed = time.monotonic() - begin
    # Had the refusals taken tokens, this wait would be about 8 s, not one interval.
    assert granted.granted
    assert 2.0 - elapsed - EPS <= granted.wait <= 2.0 + EPS


def test_default_max_wait_is_about_two_intervals_within_one_to_five_seconds():
    assert max_wait_for(2.0) == 1.0
    assert max_wait_for(1.0) == 2.0
    assert max_wait_for(0.1) == 5.0
    assert max_wait_for(100.0) == 1.0


def test_the_bucket_key_expires_once_full_again_and_not_before(redis_client, prefix):
    rate = 2.0
    key = prefix + "bucket"
    bucket = TokenBucket(redis_client, key, per_second=rate)
    waits = [bucket.take(max_wait=5.0).wait for _ in range(3)]
    assert waits[-1] > 0
    # One atomic read, so a stall of this test cannot skew the comparison.
    pipe = redis_client.pipeline(transaction=True)
    pipe.time().pttl(key).hmget(key, "tokens", "ts")
    (sec, usec), pttl, (tokens, ts) = pipe.execute()
    now = sec + usec / 1e6
    time_to_full = (1 - float(tokens)) / rate - (now - float(ts))
    # Expiring before the bucket is full again would forgive a debt (extra grants);
    # expiring much later would leave garbage. (PEXPIRE is rounded up to the ms.)
    assert time_to_full - 0.001 <= pttl / 1000 <= time_to_full + 1.0 + 0.002, (
        pttl, tokens, time_to_full)
    wait_for(lambda: not redis_client.exists(key), timeout=10, interval=0.05,
             what="the bucket key to expire")
    assert bucket.take() == Grant(True, 0.0)  # a fresh bucket is a full one


def test_a_refusal_also_leaves_a_key_that_expires(redis_client, prefix):
    key = prefix + "bucket"
    bucket = TokenBucket(redis_client, key, per_second=2.0)
    bucket.take()
    assert not bucket.take(max_wait=0.1).granted
    assert 0 < redis_client.pttl(key) <= 2000
    wait_for(lambda: not redis_client.exists(key), timeout=5, interval=0.05,
             what="the bucket key to expire")


@pytest.mark.parametrize("max_wait", [0.0, 0.3])
def test_concurrent_takers_never_get_more_than_the_rate_allows(prefix, max_wait):
    """Eight threads, each on its own connection, hammer one key for 2 s.

    Granted takes are debited in Redis time between the first and the last call, so
    they can number at most capacity + rate * (elapsed + max_wait): a reservation may
    be at most max_wait ahead. A read-then-write bucket loses updates and goes over.
    """
    rate, threads, duration = 50.0, 8, 2.0
    key = prefix + "bucket"
    barrier = threading.Barrier(threads + 1)
    counts: list[int] = []
    errors: list[BaseException] = []

    def hammer():
        client = redis.Redis.from_url(REDIS_URL)
        bucket = TokenBucket(client, key, per_second=rate)
        granted = 0
        try:
            barrier.wait()
            stop = time.monotonic() + duration
            while time.monotonic() < stop:
                if bucket.take(max_wait=max_wait).granted:
                    granted += 1
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)
        finally:
            counts.append(granted)
            client.close()

    pool = [threading.Thread(target=hammer) for _ in range(threads)]
    for thread in pool:
        thread.start()
    begin = time.monotonic()
    barrier.wait()
    for thread in pool:
        thread.join()
    elapsed = time.monotonic() - begin
    assert not errors, errors
    total = sum(counts)
    assert total <= 1 + rate * (elapsed + max_wait) + EPS, (total, elapsed)
    # Not vacuous: the takers did drain the bucket (a generous floor, for busy cores).
    assert total >= 0.25 * rate * duration, (total, counts)


# --- real workers -------------------------------------------------------------------------


def probe_overrides(**default_queue) -> dict:
    """Config overrides: the probe module imported, its tasks routed to ``default``.

    Workers take a fresh message only when a pool slot is free (no prefetch), so the
    first burst spreads over both. Re-queued tasks still gather on whichever worker
    fetches them (Celery holds countdown messages in memory, prefetch or not), so one
    worker often runs most of a burst: 18 of 20 seen, never all.
    """
    shipped = shipped_config()
    return {
        # Lists are replaced, not merged: keep the shipped imports and routes.
        "imports": [*shipped["imports"], "tests.probe_rate"],
        "queues": {"default": {
            "tasks": [*shipped["queues"]["default"]["tasks"], "tests.probe_rate.*"],
            "prefetch_multiplier": 1,
            "disable_prefetch": True,
            **default_queue,
        }},
    }


@pytest.fixture
def probe_fleet(fleet, monkeypatch):
    """The fleet fixture, with workers able to import ``tests.probe_rate``."""
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))
    return fleet


def start_two_workers(fleet) -> list:
    workers = [fleet.start_worker("default", wait=False) for _ in range(2)]
    for worker in workers:
        fleet.wait_ready(worker)
    return workers


def starts(redis_client, fleet) -> list[dict]:
    key = probe_rate.starts_key(fleet.config)
    return [json.loads(raw) for raw in redis_client.lrange(key, 0, -1)]


def send(app, name: str, count: int, label: str = "") -> list:
    return [app.send_task(name, args=[f"{label}{i}"]) for i in range(count)]


def wait_all(results: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for result in results:
        # .get raises if a task failed; every task must succeed (none dropped).
        assert result.get(timeout=max(0.1, deadline - time.monotonic())) is not None


def rate_limit_log_lines(fleet) -> list[str]:
    return [line for worker in fleet.workers for line in fleet.log_of(worker).splitlines()
            if "fleet-wide rate limit" in line and "re-queued for" in line]


@pytest.mark.slow
def test_a_queue_limit_holds_across_two_workers(probe_fleet, redis_client):
    """20 tasks at once under ``rate_limit: 120/m`` on the queue, two workers of 2 slots."""
    fleet, rate, n = probe_fleet, 2.0, 20
    fleet.configure(probe_overrides(rate_limit="120/m"))
    workers = start_two_workers(fleet)
    sent = time.time()
    wait_all(send(fleet.app(), "tests.probe_rate.record", n), timeout=45)

    runs = starts(redis_client, fleet)
    assert len(runs) == n and len({r["id"] for r in runs}) == n  # each ran exactly once
    by_worker = Counter(r["worker"] for r in runs)
    assert set(by_worker) == {w.hostname for w in workers}, by_worker
    times = [r["t"] for r in runs]
    excess = window_excess(times, rate)
    span = max(times) - sent
    print(f"fleet limit 2/s: {n} starts over {span:.1f}s after sending, "
          f"{(n - 1) / (max(times) - min(times)):.2f}/s observed, window excess "
          f"{excess:.2f} (slack {rate * RECORD_DELAY}), per worker {dict(by_worker)}")
    assert excess <= rate * RECORD_DELAY
    # The last reservation is at least (n - burst) / rate after the first take, which
    # came after sending; delays only add to it.
    assert span >= (n - 1) / rate - EPS


@pytest.mark.slow
def test_a_task_limit_applies_to_that_task_only_and_celerys_own_limit_does_not_hold(
        probe_fleet, redis_client):
    """One pair of workers, two runs.

    Control: Celery's own ``rate_limit="120/m"`` (tests.probe_rate.celery_limited) is
    per worker, so two workers run about 4/s and the fleet-wide check fails by several
    tasks. Then ``task_rate_limits: {tests.probe_rate.limited: 120/m}`` holds 2/s across
    both workers, while tests.probe_rate.record in the same queue is not held.
    """
    fleet, rate = probe_fleet, 2.0
    fleet.configure(probe_overrides(task_rate_limits={"tests.probe_rate.limited": "120/m"}))
    workers = start_two_workers(fleet)
    app = fleet.app()

    wait_all(send(app, "tests.probe_rate.celery_limited", 20, "c"), timeout=40)
    control = [r for r in starts(redis_client, fleet) if r["task"].endswith("celery_limited")]
    assert len(control) == 20
    control_workers = Counter(r["worker"] for r in control)
    assert set(control_workers) == {w.hostname for w in workers}, control_workers
    control_times = [r["t"] for r in control]
    control_excess = window_excess(control_times, rate)
    print(f"control (Celery's per-worker 120/m, two workers): "
          f"{19 / (max(control_times) - min(control_times)):.2f}/s observed, window "
          f"excess {control_excess:.2f} (slack {rate * RECORD_DELAY}), "
          f"per worker {dict(control_workers)}")
    assert control_excess > rate * RECORD_DELAY  # the check below can fail

    sent = time.time()
    limited, unlimited = [], []
    for i in range(20):  # interleaved in the queue
        limited += send(app, "tests.probe_rate.limited", 1, f"l{i}-")
        if i % 2:
            unlimited += send(app, "tests.probe_rate.record", 1, f"u{i}-")
    bucket_keys: set[bytes] = set()

    def all_ready():
        bucket_keys.update(redis_client.scan_iter(match=f"{fleet.prefix}fleet:rate:*"))
        return all(r.ready() for r in limited + unlimited)

    wait_for(all_ready, timeout=45, interval=0.2, what="the limited and unlimited tasks")
    wait_all(limited + unlimited, timeout=5)
    runs = starts(redis_client, fleet)
    limited_runs = [r for r in runs if r["task"] == "tests.probe_rate.limited"]
    unlimited_runs = [r for r in runs if r["task"] == "tests.probe_rate.record"]
    assert len(limited_runs) == 20 and len(unlimited_runs) == 10
    limited_times = [r["t"] for r in limited_runs]
    excess = window_excess(limited_times, rate)
    span = max(limited_times) - sent
    print(f"task limit 2/s: {(19) / (max(limited_times) - min(limited_times)):.2f}/s "
          f"observed, window excess {excess:.2f}, span {span:.1f}s; unlimited task done "
          f"{max(r['t'] for r in unlimited_runs) - sent:.1f}s after sending")
    assert excess <= rate * RECORD_DELAY
    assert span >= 19 / rate - EPS
    assert {r["worker"] for r in limited_runs} == {w.hostname for w in workers}
    # Only the task's bucket exists: the queue and the other task take no tokens ...
    assert bucket_keys == {f"{fleet.prefix}fleet:rate:task:tests.probe_rate.limited".encode()}
    # ... so the unlimited task is not held behind the limited one's 9.5 s.
    assert max(r["t"] for r in unlimited_runs) < max(limited_times)


@pytest.mark.slow
def test_refused_tasks_are_requeued_not_dropped_and_keep_their_retries(
        probe_fleet, redis_client):
    """Five tasks at once under 12/m: a token every 5 s and max_wait 5 s.

    The first runs at once and the second waits its 5 s; the rest would wait about
    10 s or more, so they are re-queued with a countdown (state RETRY) and run later.
    The probe task has max_retries=0 and the queue no retry policy: a re-queue that
    went through Task.retry() would fail it with MaxRetriesExceededError.
    """
    fleet, rate, n = probe_fleet, 0.2, 5
    fleet.configure(probe_overrides(rate_limit="12/m", retry=None))
    start_two_workers(fleet)
    sent = time.time()
    results = send(fleet.app(), "tests.probe_rate.record", n)
    states: dict[str, set[str]] = {r.id: set() for r in results}

    def all_ready():
        for result in results:
            states[result.id].add(result.state)
        return all(r.ready() for r in results)

    wait_for(all_ready, timeout=50, interval=0.25, what="the rate-limited tasks")
    wait_all(results, timeout=5)

    runs = starts(redis_client, fleet)
    assert sorted(r["id"] for r in runs) == sorted(states)  # each ran once, none lost
    assert all(r["max_retries"] == 0 for r in runs)  # the setting took on the worker
    assert all(r["retries"] == 0 for r in runs), runs  # re-queues used no retry
    retried = [task_id for task_id, seen in states.items() if "RETRY" in seen]
    lines = rate_limit_log_lines(fleet)
    times = [r["t"] for r in runs]
    print(f"12/m: {len(lines)} re-queues logged, RETRY seen on {len(retried)} of {n}, "
          f"last start {max(times) - sent:.1f}s after sending, window excess "
          f"{window_excess(times, rate):.2f}; e.g. {lines[:1]}")
    # Only two tasks fit in the first max_wait: at least three were re-queued.
    assert len(lines) >= n - 2
    assert all("fleet-wide rate limit 12/m on queue default: re-queued for" in line
               for line in lines)
    assert retried
    assert window_excess(times, rate) <= rate * RECORD_DELAY
    assert max(times) - sent >= (n - 1) / rate - EPS
