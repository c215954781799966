"""docs/tasks.md, followed word for word: its files written out in a directory outside
the repository, its commands run there, real workers, a real job."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys

import pytest

from fleet.payloads import open_store
from tests.conftest import ROOT
from tests.integration.test_jobs import fleet_keys

pytestmark = pytest.mark.slow

DOC = (ROOT / "docs" / "tasks.md").read_text()


def files() -> dict[str, str]:
    return dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", DOC, re.S))


def commands() -> list[list[str]]:
    block = re.search(r"<!-- run -->\n```\n(.*?)```", DOC, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def fleet_cli(args: list[str]) -> list[str]:
    assert args[0] == "fleet", args
    return [sys.executable, "-m", "fleet.cli", *args[1:]]


def test_the_page_shows_files_and_commands():
    assert {"teamtasks/__init__.py", "teamtasks/sales.py", "queues.yaml"} <= set(files())
    assert [c[:2] for c in commands()] == [["fleet", "validate"], ["fleet", "worker"],
                                           ["fleet", "worker"], ["fleet", "submit"]]


def test_a_team_module_outside_the_repository_runs_as_the_page_says(fleet, tmp_path):
    team = tmp_path / "team"
    for name, body in files().items():
        (team / name).parent.mkdir(parents=True, exist_ok=True)
        (team / name).write_text(body)
    rows = [{"region": r, "amount": a} for r, a in
            [("north", 10), ("south", 5), ("north", 1), ("east", 2), ("south", 7)]]
    (team / "sales.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {k: v for k, v in fleet.env.items() if k != "PYTHONPATH"}

    # What the page says validate prints when the module is not importable from here.
    quoted = " ".join(re.search(r"\(`(queues\.yaml:\d+: imports\.0: [^`]+)`\)", DOC,
                                re.S).group(1).split())
    elsewhere = subprocess.run(fleet_cli(["fleet", "validate", str(team / "queues.yaml")]),
                               capture_output=True, text=True, env=env, cwd=tmp_path,
                               timeout=60)
    assert elsewhere.returncode == 2
    assert f"{team}/{quoted}" in elsewhere.stderr, elsewhere.stderr

    workers = []
    try:
        for args in commands():
            if args[1] == "worker":
                log = (tmp_path / f"worker-{len(workers)}.log").open("w")
                workers.append(subprocess.Popen(fleet_cli(args), cwd=team, env=env,
                                                stdout=log, stderr=subprocess.STDOUT))
                continue
            done = subprocess.run(fleet_cli(args), capture_output=True, text=True,
                                  cwd=team, env=env, timeout=180)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert "queues.yaml: OK (2 queues: default, reports)" in \
            subprocess.run(fleet_cli(commands()[0]), capture_output=True, text=True,
                           cwd=team, env=env, timeout=60).stdout
        url = done.stdout.strip().splitlines()[-1].removeprefix("result: ")
        config = fleet.config.model_copy(update={"payloads": fleet.config.payloads.model_copy(
            update={"path": str(team / ".fleet" / "payloads")})})
        assert json.loads(open_store(config.payloads).get(url)) == {
            "north": 11, "south": 12, "east": 2}
        # The aggregate step ran where queues.yaml routes it: on reports.
        logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
        assert "teamtasks.sales.total[" in logs[1] and "teamtasks.sales.total[" not in logs[0]
        assert "teamtasks.sales.revenue[" in logs[0]
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_typo_in_a_keyword_is_refused_before_anything_is_sent(fleet, tmp_path,
                                                                redis_client):
    team = tmp_path / "team"
    for name, body in files().items():
        (team / name).parent.mkdir(parents=True, exist_ok=True)
        (team / name).write_text(body)
    (team / "sales.jsonl").write_text('{"region": "n", "amount": 1}\n')
    args = [a.replace("currency=", "curency=") for a in commands()[-1]]
    done = subprocess.run(fleet_cli(args), capture_output=True, text=True, cwd=team,
                          env=fleet.env, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "task 'teamtasks.sales.revenue' cannot be called with curency" in done.stderr
    assert fleet_keys(redis_client, fleet.prefix) == []
