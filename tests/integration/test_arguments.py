"""`-k KEY=VALUE` / `-k KEY:=JSON`: what each form makes of a value, and the errors."""

from __future__ import annotations

import pytest

from fleet.jobs.arguments import ArgumentError, parse_kwarg, parse_kwargs
from tests.integration.test_jobs import cli, fleet_keys, sales, write_jsonl


@pytest.mark.parametrize(("pair", "expected"), [
    ("group_by=region", ("group_by", "region")),
    ("mb=64", ("mb", 64)),
    ("ratio=0.5", ("ratio", 0.5)),
    ("dry=true", ("dry", True)),
    ('fields=["amount"]', ("fields", ["amount"])),
    ('opts={"a": 1}', ("opts", {"a": 1})),
    ("empty=", ("empty", "")),
    ("path=/tmp/x=y", ("path", "/tmp/x=y")),
    ('code:="007"', ("code", "007")),
    ("n:=7", ("n", 7)),
    ("note=draft [v2]", ("note", "draft [v2]")),
])
def test_values_are_json_when_they_parse_and_text_otherwise(pair, expected):
    assert parse_kwarg(pair) == expected


@pytest.mark.parametrize(("pair", "message"), [
    ("x=[1,2", "x: '[1,2' is not valid JSON: Expecting ',' delimiter at column 5 (for the "
               "text itself, pass x:='\"...\"')"),
    ('x={"a": }', "x: '{\"a\": }' is not valid JSON: Expecting value at column 7"),
    ('x="unclosed', "x: '\"unclosed' is not valid JSON: Unterminated string"),
    ("x:=region", "x: 'region' is not valid JSON: Expecting value at column 1"),
    ("novalue", "expected KEY=VALUE or KEY:=JSON, got 'novalue'"),
    ("2x=1", "expected KEY=VALUE or KEY:=JSON, got '2x=1'"),
    ("=1", "expected KEY=VALUE or KEY:=JSON, got '=1'"),
])
def test_a_value_that_looks_like_json_must_parse(pair, message):
    with pytest.raises(ArgumentError) as caught:
        parse_kwarg(pair)
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_last_of_a_repeated_key_wins():
    assert parse_kwargs(["a=1", "b=x", "a=2"]) == {"a": 2, "b": "x"}


def test_the_cli_refuses_a_broken_json_value_before_anything_is_sent(fleet, redis_client,
                                                                    tmp_path):
    data = write_jsonl(tmp_path / "s.jsonl", sales(4))
    done = cli(fleet, "submit", "tasks.aggregate.sum_by", "-i", str(data),
               "-k", "group_by=region", "-k", "fields=[amount")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Invalid value for --kwarg: fields: '[amount' is not valid JSON: Expecting " \
           "value at column 2" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert fleet_keys(redis_client, fleet.prefix) == []
