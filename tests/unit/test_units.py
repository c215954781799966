import re

import pytest

from fleet.units import (
    CPU_PATTERN,
    cpu_cores,
    format_duration,
    format_size,
    parse_duration,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("512Mi", 512 * 2**20), ("2Gi", 2 * 2**30), ("100M", 100 * 10**6), ("1.5Gi", int(1.5 * 2**30)),
    ("256Ki", 256 * 1024), (1024, 1024), ("64", 64), ("3 GiB", 3 * 2**30),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["12 parsecs", "Mi", "-1Mi", True, None, "1.2.3Gi", -5])
def test_bad_sizes_name_the_accepted_forms(bad):
    with pytest.raises(ValueError, match=r"size|negative"):
        parse_size(bad)


@pytest.mark.parametrize("typo", ["512Mb", "512mb", "512mi", "2gi", "1m", "100kb", "2GIB"])
def test_a_unit_in_the_wrong_case_is_refused_naming_the_units(typo):
    with pytest.raises(ValueError) as caught:
        parse_size(typo)
    assert f"in {typo!r}: use Ki, Mi, Gi, Ti (x1024), k, M, G, T (x1000)" in str(caught.value)
    assert "case-sensitive" in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("1k", 1000), ("1K", 1000), ("1kB", 1000), ("1KiB", 1024), ("5MB", 5 * 10**6),
    ("2TiB", 2 * 2**40), ("12B", 12), ("7", 7),
])
def test_every_documented_unit_parses(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", 30), ("10m", 600), ("1h30m", 5400), ("500ms", 0.5), (45, 45.0), ("2h", 7200),
    ("1d", 86400), (1.5, 1.5),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["10x", "m", "1h 30q", "", False, "-5s", -1])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_rates():
    assert parse_rate("100/m").per_second == pytest.approx(100 / 60)
    assert parse_rate("10/s").per_second == 10
    assert parse_rate("3600/h").per_second == 1
    assert str(parse_rate("100/m")) == "100/m"


@pytest.mark.parametrize("bad", ["100/fortnight", "100", "/m", "0/s", 100])
def test_bad_rates(bad):
    with pytest.raises(ValueError, match="rate"):
        parse_rate(bad)


def test_formatting_round_trips():
    assert format_size(512 * 2**20) == "512.0Mi"
    assert format_duration(90) == "1m30s"
    assert format_duration(0) == "0s"
    assert parse_duration(format_duration(5400)) == 5400


@pytest.mark.parametrize(("text", "cores"), [
    ("500m", 0.5), ("1500m", 1.5), ("2", 2.0), ("0.5", 0.5), ("250.5m", 0.2505), (None, None),
])
def test_cpu_quantities_are_cores(text, cores):
    """One parser for validation (requests <= limits) and the autoscaler's budget."""
    assert cpu_cores(text) == cores


@pytest.mark.parametrize(("text", "accepted"), [
    ("500m", True), ("2", True), ("0.25", True), ("1Gi", False), ("2 cores", False),
    ("-1", False), ("m", False), ("1.m", False),
])
def test_the_cpu_pattern_accepts_only_what_cpu_cores_reads(text, accepted):
    assert bool(re.match(CPU_PATTERN, text)) is accepted
