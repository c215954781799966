"""The liveness decision from a worker's local health file (fleet.health)."""

from __future__ import annotations

import pytest

from fleet.health import Health, health_path, liveness, read_health, write_health

NOW = 10_000.0


def health(**changes) -> Health:
    base = dict(pid=42, hostname="heavy@pod-1", at=NOW - 2, loop_at=NOW - 2,
                broker_ok=True, broker_since=NOW - 3600)
    return Health(**{**base, **changes})


def test_a_worker_beating_with_its_loop_turning_is_alive():
    assert liveness(health(), NOW, 60, pid_alive=True) is None


def test_a_gone_process_is_dead_whatever_its_file_says():
    assert liveness(health(), NOW, 60, pid_alive=False) == \
        "worker heavy@pod-1's process 42 is gone"


def test_a_heartbeat_that_stopped_is_dead_even_during_an_outage():
    """SIGSTOP, or a wedged interpreter: the thread that writes the file stopped."""
    for broker_ok in (True, False):
        why = liveness(health(at=NOW - 61, broker_ok=broker_ok), NOW, 60, pid_alive=True)
        assert why == "worker heavy@pod-1's heartbeat last ran 61s ago"


def test_a_stuck_event_loop_with_the_broker_up_is_dead():
    why = liveness(health(loop_at=NOW - 90), NOW, 60, pid_alive=True)
    assert why == "worker heavy@pod-1's event loop last ran 90s ago"


def test_a_loop_waiting_for_an_unreachable_broker_is_alive():
    """Celery's consumer reconnects in a loop that does not turn the event loop: the
    outage, not the worker, stops the stamp. Any length of outage."""
    stale = health(loop_at=NOW - 3600, broker_ok=False, broker_since=NOW - 3500)
    assert liveness(stale, NOW, 60, pid_alive=True) is None


def test_after_the_broker_is_back_the_loop_has_max_age_to_resume():
    back = health(loop_at=NOW - 600, broker_ok=True, broker_since=NOW - 30)
    assert liveness(back, NOW, 60, pid_alive=True) is None
    late = health(loop_at=NOW - 600, broker_ok=True, broker_since=NOW - 61)
    assert liveness(late, NOW, 60, pid_alive=True) == \
        "worker heavy@pod-1's event loop last ran 600s ago"


def test_no_loop_to_watch_is_not_a_failure():
    assert liveness(health(loop_at=None), NOW, 60, pid_alive=True) is None


def test_the_file_round_trips_and_a_bad_one_says_where(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_HEALTH_DIR", str(tmp_path))
    path = health_path("heavy@pod/1")
    assert path.parent == tmp_path and path.name == "heavy_pod_1.json"
    assert read_health(path) is None
    write_health(path, health())
    assert read_health(path) == health()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    path.write_text("{not json")
    with pytest.raises(ValueError, match=str(path)):
        read_health(path)
