"""Generated bad input: mutations of the shipped queues.yaml and of job specs.

Every case ends in a valid config / a submitted job, or in the fleet's own error with a
message a user can act on (a config problem as ``file[:line]: key: reason``), never in
another exception; a refused job leaves nothing in Redis. The counts of cases tried are
printed with the test's output.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.config import FleetConfig, load_config
from fleet.errors import ConfigError, FleetError
from fleet.jobs.submit import JobSpec, submit
from tests.conftest import shipped_config
from tests.integration.test_jobs import fleet_keys, sales, write_jsonl


def paths(value, prefix=()) -> list[tuple]:
    """Every key path of the shipped config (containers and leaves)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += paths(item, (*prefix, index))
    return out


SHIPPED = shipped_config()
PATHS = paths(SHIPPED)

units = st.sampled_from([
    "512Mb", "512mb", "2gi", "1e309Gi", "-1Mi", "0", "0s", "-5s", "1h30", "10x", "100/fortnight",
    "1.5.2Gi", "Mi", "", " ", "inf", "nan", "30 s", "100/m/s", "9" * 40, "∞",
    "\uff11\uff10s"])  # a fullwidth 10s
bad_values = st.one_of(
    units, st.none(), st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.sampled_from(["redis://", "amqp://x", "http://u:p@h/0", "*", "tasks.*", "nowhere",
                     "prefork", "solo", "ünïcødé", "a" * 300]),
)


@st.composite
def mutations(draw):
    """A copy of the shipped config with one to three keys changed, removed or added."""
    data = copy.deepcopy(SHIPPED)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            kind = draw(st.sampled_from(["set", "delete", "add"]))
            if kind == "set":
                parent[path[-1]] = draw(bad_values)
            elif kind == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=12))] = draw(bad_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced this path's parent
        done.append((kind, path))
    return data, done


OUTCOMES: Counter = Counter()


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutations())
def test_a_mutated_queues_yaml_is_valid_or_a_clear_error(tmp_path, case):
    data, done = case
    path = tmp_path / "queues.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    try:
        config = load_config(path)
    except ConfigError as exc:
        OUTCOMES["config: clear error"] += 1
        assert exc.problems, done
        for problem in exc.problems:
            # file[:line]: key: reason, on one printable line (a key made of control
            # characters or spaces is quoted, so the message shows what the file holds)
            text = str(problem)
            assert problem.file == str(path) and problem.reason.strip(), (text, done)
            assert text.startswith(f"{path}:{problem.line}: " if problem.line
                                   else f"{path}: "), (text, done)
            assert text.isprintable(), (text, done)
        return
    except Exception as exc:  # anything else is the bug this test looks for
        pytest.fail(f"{type(exc).__name__}: {exc} after {done}")
    OUTCOMES["config: valid"] += 1
    assert isinstance(config, FleetConfig)


TASKS = ["tasks.aggregate.sum_by", "tasks.heavy.crunch", "tasks.aggregate.sum_byy",
         "tasks.heavy", "", " ", "ünïcødé.task", "celery.chord", "fleet.jobs.collect"]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10),
              st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)
job_specs = st.builds(
    dict,
    task=st.sampled_from(TASKS[:2] * 4 + TASKS),  # the valid ones more often
    input=st.sampled_from(["good"] * 4 + ["bad", "empty", "lists", "missing", "ragged", "txt",
                                          "unicode", "s3"]),
    chunk_size=st.one_of(st.integers(1, 12), st.integers(1, 12), st.integers(-3, 0),
                         st.sampled_from([10**9, 2**63])),
    aggregate=st.sampled_from([None, "tasks.aggregate.merge_sums", "nope.merge", ""]),
    kwargs=st.one_of(st.just({}), st.dictionaries(
        st.sampled_from(["group_by", "fields", "mb", "x", "ünï", "records"]), json_values,
        max_size=3)),
)


@pytest.fixture
def inputs(tmp_path):
    files = {
        "good": write_jsonl(tmp_path / "good.jsonl", sales(7)),
        "bad": tmp_path / "bad.jsonl", "empty": tmp_path / "empty.jsonl",
        "lists": tmp_path / "lists.jsonl", "missing": tmp_path / "missing.jsonl",
        "ragged": tmp_path / "ragged.csv", "txt": tmp_path / "x.txt",
        "unicode": tmp_path / "dátä ünï.jsonl",
    }
    files["bad"].write_text('{"a": 1}\n{"a": ,}\n')
    files["empty"].write_text("\n")
    files["lists"].write_text('{"a": 1}\n[1]\n')
    files["ragged"].write_text("a,b\n1,2,3\n")
    files["txt"].write_text("{}\n")
    files["unicode"].write_text('{"région": "nörd", "amount": 1}\n')
    return {k: str(v) for k, v in files.items()} | {"s3": "s3://nobucket/x.jsonl"}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=job_specs)
def test_a_generated_job_spec_is_submitted_or_refused_with_nothing_sent(
        fleet, redis_client, inputs, monkeypatch, spec):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no wait for EC2 credentials
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    spec = {**spec, "input": inputs[spec["input"]]}
    before = fleet_keys(redis_client, fleet.prefix)
    try:
        done = submit(fleet.app(), JobSpec(**spec))
    except FleetError as exc:
        OUTCOMES["job: clear error"] += 1
        assert str(exc).strip(), spec
        assert "Traceback" not in str(exc)
        assert fleet_keys(redis_client, fleet.prefix) == before, spec  # nothing sent
        return
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__}: {exc} for {spec}")
    OUTCOMES["job: submitted"] += 1
    assert done.chunks == math.ceil(done.records / spec["chunk_size"])
    # Make room for the next case: what it sent goes (no worker runs it).
    for key in set(fleet_keys(redis_client, fleet.prefix)) - set(before):
        redis_client.delete(key)


def test_the_counts_of_generated_cases(capsys):
    """Runs after the two above (file order): says how many cases each outcome had."""
    total = sum(OUTCOMES.values())
    with capsys.disabled():
        print(f"\ngenerated bad input: {total} cases: "
              + ", ".join(f"{k} {v}" for k, v in sorted(OUTCOMES.items())))
    # Each generator reached both of its outcomes (a generator that only ever produced
    # valid input, or only errors, would test half of what it claims).
    if OUTCOMES["config: clear error"] + OUTCOMES["config: valid"]:
        assert OUTCOMES["config: clear error"] and OUTCOMES["config: valid"]
    if OUTCOMES["job: clear error"] + OUTCOMES["job: submitted"]:
        assert OUTCOMES["job: clear error"] and OUTCOMES["job: submitted"]
