"""One test per validation rule of queues.yaml, through the real loader and CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.config import load_config
from fleet.errors import ConfigError
from tests.conftest import ROOT, deep_merge, shipped_config


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "queues.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def problems(tmp_path: Path, overrides: dict | str) -> list[str]:
    data = overrides if isinstance(overrides, str) else deep_merge(shipped_config(), overrides)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [f"{p.path}: {p.reason}" for p in caught.value.problems]


def only(found: list[str]) -> str:
    assert len(found) == 1, found
    return found[0]


def test_shipped_queues_yaml_is_valid():
    config = load_config(ROOT / "queues.yaml")
    assert {"default", "io", "heavy", "xl"} <= set(config.queues)
    heavy = config.queues["heavy"]
    assert heavy.prefetch_multiplier == 1 and heavy.acks_late and heavy.reject_on_worker_lost
    assert heavy.memory_limit == 2**30
    assert config.queues["io"].pool == "threads" and config.queues["io"].concurrency >= 16
    assert config.queues["xl"].memory_limit > heavy.memory_limit


def test_unknown_key(tmp_path):
    assert only(problems(tmp_path, {"queues": {"heavy": {"prefetch": 1}}})) == (
        "queues.heavy.prefetch: unknown key")


def test_unknown_top_level_key(tmp_path):
    assert only(problems(tmp_path, {"queuez": {}})) == "queuez: unknown key"


def test_wrong_type(tmp_path):
    found = only(problems(tmp_path, {"queues": {"heavy": {"concurrency": "lots"}}}))
    assert found.startswith("queues.heavy.concurrency: Input should be a valid integer")
    assert "'lots'" in found


def test_wrong_choice(tmp_path):
    found = only(problems(tmp_path, {"queues": {"io": {"pool": "gevent"}}}))
    assert found.startswith("queues.io.pool: Input should be 'prefork', 'threads' or 'solo'")


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"queues": {"heavy": {"memory_limit": "1 gigabyte"}}},
     "queues.heavy.memory_limit: unknown size unit 'gigabyte' in '1 gigabyte': use Ki, Mi"),
    ({"queues": {"heavy": {"memory_limit": "512Mb"}}},
     "queues.heavy.memory_limit: unknown size unit 'Mb' in '512Mb'"),
    ({"queues": {"heavy": {"memory_limit": [512]}}},
     "queues.heavy.memory_limit: expected a size like 512Mi"),
    ({"broker": {"visibility_timeout": "a while"}},
     "broker.visibility_timeout: expected a duration like 30s"),
    ({"queues": {"io": {"rate_limit": "100/fortnight"}}},
     "queues.io.rate_limit: expected a rate like 100/m"),
    ({"queues": {"heavy": {"time_limit": {"soft": "5 minutes"}}}},
     "queues.heavy.time_limit.soft: expected a duration"),
])
def test_bad_units(tmp_path, overrides, expected):
    assert only(problems(tmp_path, overrides)).startswith(expected)


@pytest.mark.parametrize(("overrides", "key"), [
    ({"queues": {"heavy": {"memory_limit": 0}}}, "queues.heavy.memory_limit"),
    ({"queues": {"heavy": {"memory_limit": "0Mi"}}}, "queues.heavy.memory_limit"),
    ({"queues": {"heavy": {"time_limit": {"hard": "0s"}}}}, "queues.heavy.time_limit.hard"),
    ({"queues": {"io": {"time_limit": {"soft": 0}}}}, "queues.io.time_limit.soft"),
    ({"queues": {"xl": {"kubernetes": {"resources": {"limits": {"memory": "0Gi"}}}}}},
     "queues.xl.kubernetes.resources.limits.memory"),
    ({"queues": {"io": {"autoscaling": {"target_wait": "0s"}}}},
     "queues.io.autoscaling.target_wait"),
    ({"autoscaler": {"interval": 0}}, "autoscaler.interval"),
    ({"autoscaler": {"worker_metrics_interval": "0ms"}}, "autoscaler.worker_metrics_interval"),
    ({"broker": {"visibility_timeout": 0}}, "broker.visibility_timeout"),
    ({"broker": {"lease": {"interval": "0s"}}}, "broker.lease.interval"),
    ({"results": {"expires": 0}}, "results.expires"),
])
def test_a_zero_that_means_nothing_is_an_error(tmp_path, overrides, key):
    found = problems(tmp_path, overrides)
    assert f"{key}: must be more than 0 (leave the key out where none is meant)" in found, \
        found


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("api_qps", 0, "Input should be greater than 0 (got 0)"),
    ("api_burst", 0, "Input should be greater than or equal to 1 (got 0)"),
])
def test_an_api_rate_limit_that_would_never_send_a_request(tmp_path, key, value, expected):
    found = only(problems(tmp_path, {"autoscaler": {"kubernetes": {key: value}}}))
    assert found == f"autoscaler.kubernetes.{key}: {expected}", found


def test_size_rule_to_undefined_queue(tmp_path):
    found = only(problems(tmp_path, {"size_rules": [{"over": "1Gi", "queue": "xxl"}]}))
    assert found.startswith("size_rules.0.queue: routes to undefined queue 'xxl'")


def test_default_queue_undefined(tmp_path):
    found = only(problems(tmp_path, {"default_queue": "fast"}))
    assert found.startswith("default_queue: routes to undefined queue 'fast'")


def test_memory_retry_to_undefined_queue(tmp_path):
    found = only(problems(tmp_path, {"queues": {"heavy": {
        "on_memory_exceeded": {"retry_on": "huge"}}}}))
    assert found.startswith("queues.heavy.on_memory_exceeded.retry_on: routes to undefined")


def test_soft_limit_not_below_hard_limit(tmp_path):
    found = only(problems(tmp_path, {"queues": {"heavy": {
        "time_limit": {"soft": "11m", "hard": "10m"}}}}))
    assert found == ("queues.heavy.time_limit.soft: soft limit (11m) must be below the hard "
                     "limit (10m), or SoftTimeLimitExceeded never fires")


def test_hard_limit_past_visibility_timeout_without_lease(tmp_path):
    found = problems(tmp_path, {"broker": {"lease": {"enabled": False},
                                           "visibility_timeout": "10m"}})
    # heavy (11m) and xl (32m) run past 10 minutes; io has no limit at all.
    assert any(p.startswith("queues.heavy.time_limit.hard: hard limit (11m) must be below "
                            "broker.visibility_timeout (10m)") for p in found), found
    assert any(p.startswith("queues.xl.time_limit.hard") for p in found), found
    assert any(p.startswith("queues.io.time_limit: acks_late with no hard time limit")
               for p in found), found
    assert not any(p.startswith("queues.default.") for p in found), found


def test_with_lease_on_long_hard_limits_are_fine(tmp_path):
    data = deep_merge(shipped_config(), {"broker": {"visibility_timeout": "1m"}})
    assert load_config(write(tmp_path, data)).queues["xl"].time_limit.hard == 32 * 60


def test_lease_interval_must_fit_twice_in_the_timeout(tmp_path):
    found = only(problems(tmp_path, {"broker": {"visibility_timeout": "30s",
                                                "lease": {"interval": "20s"}}}))
    assert found.startswith("broker.lease.interval: must be at most half")


def test_memory_limit_above_pod_limit(tmp_path):
    found = only(problems(tmp_path, {"queues": {"heavy": {"memory_limit": "2Gi"}}}))
    assert found == ("queues.heavy.memory_limit: 2.0Gi is above kubernetes.resources.limits."
                     "memory (1.5Gi): the kernel kills the pod before the guard acts")


def test_memory_limit_times_concurrency_above_pod_limit(tmp_path):
    found = only(problems(tmp_path, {"queues": {"default": {"concurrency": 4}}}))
    assert found.startswith("queues.default.memory_limit: 384.0Mi x concurrency 4 + 128.0Mi "
                            "for the worker's main process = 1.6Gi is above "
                            "kubernetes.resources.limits.memory (1.0Gi)")


def test_the_main_process_share_counts_against_the_pod_limit(tmp_path):
    # 2 x 480Mi fits 1Gi alone; with the main process beside the children it does not.
    found = only(problems(tmp_path, {"queues": {"default": {"memory_limit": "480Mi"}}}))
    assert found.startswith("queues.default.memory_limit: 480.0Mi x concurrency 2 + 128.0Mi")
    fits = deep_merge(shipped_config(), {"queues": {"default": {"memory_limit": "448Mi"}}})
    assert load_config(write(tmp_path, fits)).queues["default"].memory_limit == 448 << 20


def test_duplicate_queue_names(tmp_path):
    text = (ROOT / "queues.yaml").read_text() + (
        "  heavy:\n    tasks: [other.*]\n")
    found = problems(tmp_path, text)
    assert only(found).startswith("queues.heavy: duplicate key (first defined on line ")


def test_task_claimed_by_two_queues(tmp_path):
    found = only(problems(tmp_path, {"queues": {"io": {"tasks": ["tasks.io.*",
                                                                 "tasks.heavy.*"]}}}))
    # Reported where the pattern appears the second time, in file order.
    assert found == "queues.heavy.tasks.0: 'tasks.heavy.*' is already claimed by queue 'io'"


def test_two_globs_that_tie_on_some_name_are_an_error(tmp_path):
    # 'tasks.*.io' and 'tasks.io.*' both take 'tasks.io.io', with 9 literal characters each.
    found = only(problems(tmp_path, {"queues": {
        "io": {"tasks": ["tasks.io.*"]}, "heavy": {"tasks": ["tasks.*.io"]}}}))
    assert found == ("queues.heavy.tasks.0: 'tasks.*.io' and 'tasks.io.*' (queue 'io') can "
                     "match the same task name and neither is more specific (the glob with "
                     "more literal characters wins, an exact name beats both): make one "
                     "narrower, or list the names")


@pytest.mark.parametrize("tasks", [
    {"io": ["tasks.*"], "heavy": ["tasks.heavy.*"]},         # the more specific one wins
    {"io": ["tasks.io.*"], "heavy": ["tasks.heavy.*"]},      # disjoint
    {"io": ["tasks.[ab]*"], "heavy": ["tasks.[cd]*"]},       # classes with nothing shared
    {"io": ["tasks.io.*", "tasks.heavy.big"], "heavy": ["tasks.heavy.*"]},  # exact wins
])
def test_globs_that_cannot_tie_are_fine(tmp_path, tasks):
    assert problems_or_none(
        tmp_path, {"queues": {q: {"tasks": t} for q, t in tasks.items()}}) == []


def test_memory_limit_needs_prefork(tmp_path):
    found = only(problems(tmp_path, {"queues": {"io": {"memory_limit": "128Mi"}}}))
    assert found.startswith("queues.io.memory_limit: needs pool: prefork")


def test_time_limits_need_prefork(tmp_path):
    found = only(problems(tmp_path, {"queues": {"io": {"time_limit": {"hard": "1m"}}}}))
    assert found.startswith("queues.io.time_limit: needs pool: prefork")


def test_memory_retry_must_go_to_a_larger_class(tmp_path):
    found = only(problems(tmp_path, {"queues": {"heavy": {
        "on_memory_exceeded": {"retry_on": "default"}}}}))
    assert found.startswith("queues.heavy.on_memory_exceeded.retry_on: queue 'default' has "
                            "memory_limit 384.0Mi, not larger")
    same = only(problems(tmp_path, {"queues": {"heavy": {
        "on_memory_exceeded": {"retry_on": "heavy"}}}}))
    assert "retries on the same queue" in same


def test_replica_bounds_ordered(tmp_path):
    found = only(problems(tmp_path, {"queues": {"xl": {"autoscaling": {
        "min_replicas": 3, "max_replicas": 2}}}}))
    assert found == "queues.xl.autoscaling.min_replicas: 3 is above max_replicas (2)"


def test_requests_within_limits(tmp_path):
    found = problems(tmp_path, {"queues": {"io": {"kubernetes": {"resources": {
        "requests": {"cpu": "2", "memory": "1Gi"}}}}}})
    assert "queues.io.kubernetes.resources.requests.memory: 1.0Gi is above limits.memory " \
           "(512.0Mi)" in found
    assert "queues.io.kubernetes.resources.requests.cpu: 2 is above limits.cpu (500m)" in found


def test_retry_on_unknown_exception(tmp_path):
    found = only(problems(tmp_path, {"queues": {"io": {"retry": {
        "exceptions": ["ConnectionError", "NoSuchError"]}}}}))
    assert found == ("queues.io.retry.exceptions.1: 'NoSuchError' is not an exception class "
                     "(builtin or dotted path)")


def test_every_problem_is_reported_at_once_with_lines(tmp_path):
    data = deep_merge(shipped_config(), {
        "queues": {"heavy": {"concurrency": 0, "time_limit": {"soft": "2h"}}},
        "size_rules": [{"over": "1Gi", "queue": "nowhere"}],
    })
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    # Structural errors stop before cross-key rules: the first pass lists them all.
    assert [p.path for p in caught.value.problems] == ["queues.heavy.concurrency"]
    text = path.read_text().splitlines()
    problem = caught.value.problems[0]
    assert "concurrency: 0" in text[problem.line - 1]


@pytest.mark.parametrize(("text", "expected"), [
    ("", "file is empty"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    ("queues: {a: [1, 2}\n", "not valid YAML"),
    ("queues: {}\n", "queues: Dictionary should have at least 1 item"),
])
def test_unusable_files(tmp_path, text, expected):
    assert expected in " ".join(problems(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


def test_cli_validate_ok():
    result = run_cli("validate", str(ROOT / "queues.yaml"))
    assert result.returncode == 0, result.stderr
    assert "OK (4 queues: default, io, heavy, xl)" in result.stdout


def test_cli_validate_lists_every_problem_and_exits_2(tmp_path):
    data = deep_merge(shipped_config(), {
        "queues": {"heavy": {"time_limit": {"soft": "20m"}, "memory_limit": "3Gi"}},
        "size_rules": [{"over": "1Gi", "queue": "nowhere"}],
    })
    path = write(tmp_path, data)
    result = run_cli("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"fleet: 3 problems in {path}:"
    assert any(f"{path}:" in line and "queues.heavy.time_limit.soft: soft limit (20m)" in line
               for line in lines)
    assert any("queues.heavy.memory_limit: 3.0Gi is above" in line for line in lines)
    assert any("size_rules.0.queue: routes to undefined queue 'nowhere'" in line
               for line in lines)


def test_a_long_problem_list_shows_the_first_twenty_and_counts_the_rest(tmp_path):
    data = deep_merge(shipped_config(), {"size_rules": [
        {"over": "1Gi", "queue": f"nowhere{i}"} for i in range(30)]})
    path = write(tmp_path, data)
    result = run_cli("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"fleet: 30 problems in {path}:"
    assert len(lines) == 1 + 20 + 1, lines
    assert "size_rules.0.queue: routes to undefined queue 'nowhere0'" in lines[1]
    assert "size_rules.19.queue" in lines[20] and "nowhere20" not in result.stderr
    assert lines[-1] == "  ... and 10 more"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.problems) == 30  # all kept for code; only the text is capped
    assert str(caught.value).endswith("... and 10 more")


@pytest.mark.parametrize("url", ["amqp://guest:s3cret@127.0.0.1//", "http://u:s3cret@h/0",
                                 "127.0.0.1:6379"])
def test_a_broker_url_redis_cannot_open_is_a_config_error(tmp_path, url):
    scheme = url.split("://")[0] + "://" if "://" in url else "no scheme"
    reason = f"must be a redis://, rediss:// or unix:// URL, got {scheme}"
    assert problems(tmp_path, {"broker": {"url": url}}) == [f"broker.url: {reason}"]
    assert problems(tmp_path, {"results": {"url": url}}) == [f"results.url: {reason}"]
    # From the environment, for every command (not a ValueError at the first connect).
    env = {**os.environ, "FLEET_BROKER_URL": url}
    shipped = str(ROOT / "queues.yaml")
    for args in (["validate", shipped], ["probe", "--queue", "default", "--config", shipped],
                 ["jobs", "list", "--config", shipped]):
        done = subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True,
                              text=True, env=env, timeout=60, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert f"environment: FLEET_BROKER_URL: {reason}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "s3cret" not in done.stderr


def test_redis_urls_of_every_kind_are_accepted(tmp_path):
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@cache.example:6380/1",
                "unix:///run/redis.sock?db=2", "REDIS://h/0"):
        assert problems_or_none(tmp_path, {"broker": {"url": url}}) == [], url


def problems_or_none(tmp_path: Path, overrides: dict) -> list[str]:
    try:
        load_config(write(tmp_path, deep_merge(shipped_config(), overrides)))
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


@pytest.mark.parametrize(("text", "line"), [
    ("version: 1\nbroker: &b\n  url: redis://127.0.0.1:6379/0\n  again: *b\n", 4),
    ("version: 1\nqueues: &q [1, *q]\n", 2),
])
def test_a_recursive_alias_is_invalid_yaml_not_a_recursion_error(tmp_path, text, line):
    path = write(tmp_path, text)
    result = run_cli("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}:{line}: (top level): not valid YAML: recursive alias" in result.stderr


@pytest.mark.timeout(60)
def test_aliases_that_expand_exponentially_are_refused_not_walked(tmp_path):
    # "Billion laughs": 9 levels of 9 aliases each, 387 million nodes once expanded.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = write(tmp_path, "\n".join(["version: 1", "bomb:", *("  " + lv for lv in levels)]))
    result = run_cli("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "not valid YAML: aliases expand to more than 100,000 nodes" in result.stderr


def test_cli_validate_missing_file_exits_2(tmp_path):
    result = run_cli("validate", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "missing.yaml: (top level): file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_queue_names_must_make_kubernetes_names(tmp_path):
    data = shipped_config()
    data["queues"]["Big_Jobs"] = data["queues"].pop("xl")
    data["queues"]["heavy"]["on_memory_exceeded"]["retry_on"] = "Big_Jobs"
    data["size_rules"][0]["queue"] = "Big_Jobs"
    found = only(problems(tmp_path, yaml.safe_dump(data)))
    assert found.startswith("queues.Big_Jobs: queue name must be lowercase letters, digits "
                            "and '-', and make a Deployment name ('fleet-worker-Big_Jobs')")


def test_max_deliveries_defaults_to_three_and_must_be_at_least_one(tmp_path):
    assert {q.max_deliveries for q in load_config(ROOT / "queues.yaml").queues.values()} == {3}
    path = write(tmp_path, deep_merge(shipped_config(), {"queues": {"heavy": {
        "max_deliveries": 0}}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert f"{problem.path}: {problem.reason}" == (
        "queues.heavy.max_deliveries: Input should be greater than or equal to 1 (got 0)")
    line = path.read_text().splitlines()[problem.line - 1]
    assert line.strip() == "max_deliveries: 0"
    assert only(problems(tmp_path, {"queues": {"heavy": {"max_deliveries": "many"}}})
                ).startswith("queues.heavy.max_deliveries: Input should be a valid integer")


def test_a_grace_over_the_platform_cap_names_the_queue_and_the_ways_out(tmp_path):
    """Cluster Autoscaler drains a node giving each pod at most 600 s by default: heavy's
    11m hard limit needs 690 s and xl's 32m 1950 s, so each is refused at the default cap
    (the shipped queues.yaml raises it on purpose)."""
    found = problems(tmp_path, {"autoscaler": {"kubernetes": {"max_termination_grace": "10m"}}})
    assert [f.split(":")[0] for f in found] == ["queues.heavy.time_limit.hard",
                                                 "queues.xl.time_limit.hard"]
    heavy = found[0]
    assert "its pods need 690s to stop (its hard time limit 11m for a task started just " \
           "before SIGTERM, + 30s to exit), over the 10m the platform honours" in heavy
    assert "Lower time_limit.hard to 9m30s or less, or raise max_termination_grace on " \
           "purpose" in heavy
    # Within the cap: accepted, the one hard limit lowered is enough for heavy.
    assert [f.split(":")[0] for f in problems(tmp_path, {"autoscaler": {"kubernetes": {
        "max_termination_grace": "10m"}}, "queues": {"heavy": {"time_limit": {
            "soft": "9m", "hard": "9m30s"}}}})] == ["queues.xl.time_limit.hard"]


def test_render_refuses_a_grace_over_the_cap_in_one_line(tmp_path):
    data = deep_merge(shipped_config(), {"autoscaler": {"kubernetes": {
        "max_termination_grace": "10m"}}, "queues": {"xl": {"time_limit": {
            "soft": "5m", "hard": "6m"}}}})
    path = write(tmp_path, data)
    for args in (["render", "k8s", "--config", str(path)], ["validate", str(path)]):
        done = subprocess.run([sys.executable, "-m", "fleet.cli", *args], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "queues.heavy.time_limit.hard" in done.stderr and "690s to stop" in \
            done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "kind: Deployment" not in done.stdout


def test_minimums_above_the_capacity_budget_are_refused(tmp_path):
    """default needs 250m per replica: four of them and heavy's one core are 2 cores, over a
    1.5-core budget."""
    found = only(problems(tmp_path, {
        "autoscaler": {"capacity": {"cpu": "1500m", "memory": "24Gi"}},
        "queues": {"default": {"autoscaling": {"min_replicas": 4}},
                   "heavy": {"autoscaling": {"min_replicas": 1}}}}))
    assert found == ("autoscaler.capacity.cpu: the queues' min_replicas together request 2 "
                     "cores, more than the budget's 1.5 cores: raise the budget or lower some "
                     "min_replicas (each queue's requests x min_replicas)")


def test_a_replica_bigger_than_the_whole_budget_is_refused(tmp_path):
    found = only(problems(tmp_path, {"autoscaler": {"capacity": {"cpu": "8",
                                                                 "memory": "4Gi"}}}))
    assert found == ("queues.xl.kubernetes.resources.requests.memory: one replica requests "
                     "5.0Gi, more than the whole capacity budget (autoscaler.capacity.memory: "
                     "4.0Gi): the autoscaler could never start one")
