"""The dashboard's OpenAPI spec, fuzzed over real HTTP (schemathesis): whatever the
input, no request gets a 5xx, and every answer is what the spec says it is (its status
documented, its content type and its body valid against the route's response model, or
for a refusal the ``{"error": ...}`` shape). Runs against a live dashboard on the test's
own key prefix and database, with no workers (control actions then answer 4xx, never
5xx)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.errors import FailureGroup

from autoscale.sim.whatif import SimulatedWhatIf
from tests.integration.dashboard_util import FAST, start_dashboard

pytestmark = pytest.mark.slow

#: Not fuzzed: stopping workers would reach other tests' workers on the shared Redis.
SKIPPED = ("/api/worker/shutdown/{name}",)
#: The answer matches the spec: the status is documented, the body valid against its schema.
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


def test_no_input_makes_the_api_fail_with_a_5xx_or_answer_off_its_spec(fleet, tmp_path):
    fleet.configure(FAST)
    # The what-if view wired in as `fleet dashboard` does (its candidate the current
    # settings: no tuner here), without plots: an empty store replays nothing anyway.
    whatif = SimulatedWhatIf(lambda _header, _tasks, config: config, plots=False)
    board = start_dashboard(fleet.config, f"sqlite:///{tmp_path / 'd.sqlite'}",
                            whatif=whatif)
    try:
        schema = schemathesis.openapi.from_url(board.base + "/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        fuzzed = [op for op in operations if op.path not in SKIPPED]
        assert len(fuzzed) >= 30, [op.path for op in operations]
        server_errors, off_spec, answered = [], [], []
        for operation in fuzzed:

            @given(case=operation.as_strategy())
            @settings(max_examples=15, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def call(case):
                try:
                    response = case.call(base_url=board.base, timeout=30)
                except Exception as exc:  # a hang or a dropped connection is a failure too
                    server_errors.append((case.method, case.formatted_path, repr(exc)))
                    return
                if response.status_code >= 500:
                    server_errors.append((case.method, case.formatted_path,
                                          response.status_code, response.text[:300]))
                try:
                    case.validate_response(response, checks=CONFORMANCE)
                except FailureGroup as exc:  # each failed check's report (not an Exception)
                    off_spec.append((case.method, case.formatted_path, response.status_code,
                                     str(exc)[:600]))
                answered.append(response.status_code)

            call()
        assert server_errors == []
        assert off_spec == []
        # The bodies checked include successes, not only refusals of bad input.
        assert sum(status == 200 for status in answered) >= 100, answered
    finally:
        board.stop()
