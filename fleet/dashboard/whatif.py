"""The "what if" view's runner: a window of the stored tasks (the same export as
``fleet trace export``), replayed by the seam the composition root gave the dashboard
(fleet/whatif.py; the simulator's is autoscale/sim/whatif.py), one run at a time, its
answer kept briefly.

Why one at a time: a replay of an hour takes from a tenth of a second to seconds (with
the tuner, one replay per trial), all of it CPU in this process; two users pressing
the button together would halve each other's speed and the pages' too. A second run
asked while one is under way is refused (WhatIfBusy, 429 with Retry-After), unless it
is the one under way's window, which it waits for. Why a cache: the page asks again
when it is opened again, and a window's answer changes only with new tasks or
settings; it is keyed by the window as asked (``1h`` is "the last hour": the same for
``TTL`` seconds) and a hash of both settings.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import yaml

from fleet.config import FleetConfig, parse_config
from fleet.dashboard import traces
from fleet.errors import ConfigError, FleetError
from fleet.trace.model import Task
from fleet.whatif import Outcome, Side, UnavailableWhatIf, WhatIf, WhatIfUnavailable, ratios

#: Seconds an answer is kept, and answers kept at most (each holds two SVG plots).
TTL = 60.0
KEPT = 8
#: The longest window: a day of a large fleet is a minute of simulation per side.
MAX_WINDOW = 86_400.0
DEFAULT_SINCE = "1h"
NOT_WIRED = ("what-if is not configured in this dashboard: `fleet dashboard` and "
             "`fleet up` wire the simulator in (it needs pip install 'fleet[tune]')")


class WhatIfWindowError(FleetError):
    """A window that cannot be replayed; the message says why (400)."""


class CandidateError(FleetError):
    """Pasted candidate settings that are not a queues.yaml fragment of the settings a
    what-if may change (400, with the file's problems)."""


class WhatIfBusy(FleetError):
    """Another what-if is running (429); ``retry_after`` is a guess in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def window(since: str | None, until: str | None, now: float) -> tuple[float, float]:
    """Epoch seconds of ``since``..``until``: durations ago (``1h``) or ISO times, as
    ``fleet trace export`` takes them; default the last hour."""
    try:
        start = traces.instant(since or DEFAULT_SINCE, now)
    except ValueError as exc:
        raise WhatIfWindowError(f"since: {exc}") from None
    try:
        end = now if until in (None, "") else traces.instant(until, now)
    except ValueError as exc:
        raise WhatIfWindowError(f"until: {exc}") from None
    if start >= end:
        raise WhatIfWindowError(f"the window is empty: since ({_iso(start)}) is not "
                                f"before until ({_iso(end)})")
    if end - start > MAX_WINDOW:
        raise WhatIfWindowError(f"the window is {(end - start) / 3600:.1f} h long: at most "
                                f"{MAX_WINDOW / 3600:g} h can be replayed here (use fleet "
                                "trace export and fleet simulate for longer ones)")
    return start, end


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


#: What a pasted candidate may set: the autoscaler's settings and the queues' (names
#: queues.yaml has; a new queue would have no tasks, a queue's settings no other meaning).
CANDIDATE_KEYS = ("queues", "autoscaler")
MAX_CANDIDATE = 4000


def candidate_config(current: FleetConfig, text: str) -> FleetConfig:
    """The current settings with a pasted queues.yaml fragment over them, e.g.
    ``queues: {io: {autoscaling: {max_replicas: 6}}}``, parsed and validated as
    queues.yaml is (the same problems, the same messages)."""
    if len(text) > MAX_CANDIDATE:
        raise CandidateError(f"candidate settings: at most {MAX_CANDIDATE} characters")
    try:
        fragment = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CandidateError(f"candidate settings are not YAML: {exc}") from None
    if not isinstance(fragment, dict) or not fragment:
        raise CandidateError("candidate settings: expected a mapping such as "
                             "queues: {io: {autoscaling: {max_replicas: 6}}}")
    if extra := [k for k in fragment if k not in CANDIDATE_KEYS]:
        raise CandidateError(f"candidate settings: {', '.join(map(str, extra))} cannot be "
                             f"changed here (only {', '.join(CANDIDATE_KEYS)})")
    queues = fragment.get("queues") or {}
    if not isinstance(queues, dict):
        raise CandidateError("candidate settings: queues must be a mapping of queue names")
    if unknown := [q for q in queues if q not in current.queues]:
        raise CandidateError(f"candidate settings: no queue {', '.join(map(repr, unknown))} "
                             f"in {current.source} (queues: {', '.join(current.queues)})")

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = (merge(out[key], value) if isinstance(value, dict)
                        and isinstance(out.get(key), dict) else value)
        return out

    try:
        return parse_config(merge(current.model_dump(mode="json"), fragment),
                            "candidate settings")
    except ConfigError as exc:
        raise CandidateError("; ".join(exc.lines())) from None


def config_hash(config: FleetConfig) -> str:
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()


def changes(current: FleetConfig, candidate: FleetConfig) -> list[dict[str, Any]]:
    """The settings that differ, as dotted keys (``queues.io.autoscaling.target_wait``):
    what the candidate would change in queues.yaml."""
    def flat(value, prefix: str, out: dict) -> dict:
        if isinstance(value, dict):
            for k, v in value.items():
                flat(v, f"{prefix}.{k}" if prefix else str(k), out)
        else:
            out[prefix] = value
        return out

    include = {"queues", "autoscaler"}
    old = flat(current.model_dump(mode="json", include=include), "", {})
    new = flat(candidate.model_dump(mode="json", include=include), "", {})
    return [{"setting": k, "current": old.get(k), "candidate": new.get(k)}
            for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def side_json(side: Side, run: str) -> dict[str, Any]:
    return {"label": side.label, "source": side.source, "total": asdict(side.total),
            "queues": [asdict(q) for q in side.queues],
            "plot": f"/api/fleet/whatif/{run}/{side.label}.svg" if side.svg else None}


class WhatIfRunner:
    """One per dashboard process (the rule of one run at a time is per process: each
    dashboard replica has its own CPU); its answers and their plots in memory, since
    they are a minute's worth and cheap to make again."""

    def __init__(self, config: FleetConfig, database: str, whatif: WhatIf | None, *,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.database = database
        self.whatif = whatif
        self.clock = clock
        self._lock = threading.Lock()
        self._guard = threading.Lock()  # the cache and the record of the run under way
        self._kept: OrderedDict[str, tuple[float, dict[str, Any], Outcome | None]] = \
            OrderedDict()
        self._running: tuple[str, float, threading.Event] | None = None

    # -- what the routes call ----------------------------------------------------------

    def answer(self, since: str | None = None, until: str | None = None,
               queues: Iterable[str] = (), candidate: str | None = None) -> dict[str, Any]:
        """The what-if of the window (blocking: run it in a thread), against the tuner's
        settings or ``candidate`` (a pasted queues.yaml fragment). Raises
        WhatIfUnavailable, WhatIfWindowError, CandidateError or WhatIfBusy."""
        if self.whatif is None:
            raise WhatIfUnavailable(NOT_WIRED)
        if isinstance(self.whatif, UnavailableWhatIf):  # say so before any export
            raise WhatIfUnavailable(self.whatif.reason)
        chosen = list(dict.fromkeys(q for part in queues for q in part.split(",") if q))
        if unknown := [q for q in chosen if q not in self.config.queues]:
            raise WhatIfWindowError(f"no queue {', '.join(map(repr, unknown))} in "
                                    f"{self.config.source} (queues: "
                                    f"{', '.join(self.config.queues)})")
        now = self.clock()
        start, end = window(since, until, now)
        given = candidate_config(self.config, candidate) if candidate else None
        key = self._key(since or DEFAULT_SINCE, until or "", chosen,
                        config_hash(given) if given else "tuner")
        while True:
            if (kept := self._cached(key)) is not None:
                return {**kept, "cached": True}
            if self._lock.acquire(blocking=False):
                break
            self._wait_or_refuse(key)
        try:
            began = time.monotonic()
            with self._guard:
                self._running = (key, began, threading.Event())
            out, outcome = self._run(key, start, end, chosen, now, given)
            out["seconds"] = round(time.monotonic() - began, 3)
            with self._guard:
                self._kept[key] = (self.clock() + TTL, out, outcome)
                while len(self._kept) > KEPT:
                    self._kept.popitem(last=False)
            return {**out, "cached": False}
        finally:
            with self._guard:
                done, self._running = self._running, None
            if done is not None:
                done[2].set()
            self._lock.release()

    def plot(self, run: str, label: str) -> str | None:
        """The SVG of a kept answer's side, None once it is gone (TTL) or unknown."""
        with self._guard:
            for _expires, out, outcome in self._kept.values():
                if out.get("run") == run and outcome is not None:
                    side = {"current": outcome.current, "candidate": outcome.candidate}
                    return side[label].svg if label in side else None
        return None

    # -- the parts ----------------------------------------------------------------------

    def _key(self, since: str, until: str, queues: list[str], candidate: str) -> str:
        text = "\x00".join([since.strip(), until.strip(), ",".join(sorted(queues)),
                            config_hash(self.config), candidate])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _cached(self, key: str) -> dict[str, Any] | None:
        with self._guard:
            kept = self._kept.get(key)
            if kept is None:
                return None
            if kept[0] < self.clock():
                del self._kept[key]
                return None
            return kept[1]

    def _wait_or_refuse(self, key: str) -> None:
        """Waits for the run under way if it is this window's; else WhatIfBusy."""
        with self._guard:
            running = self._running
        if running is None:
            time.sleep(0.01)  # released between the check and now: try again
            return
        other, began, done = running
        if other == key:
            done.wait(timeout=300)
            return
        busy_for = time.monotonic() - began
        raise WhatIfBusy(f"another what-if is running (for {busy_for:.0f} s); one runs at "
                         "a time: try again shortly", retry_after=max(1, round(busy_for)))

    def _run(self, key: str, start: float, end: float, queues: list[str], now: float,
             candidate: FleetConfig | None) -> tuple[dict[str, Any], Outcome | None]:
        # The config's queues only: a stored task of a queue queues.yaml no longer has
        # cannot be replayed under its settings.
        done = traces.export(self.config, self.database, since=start, until=end,
                             queues=queues or list(self.config.queues), now=now)
        tasks = [r for r in done.records if isinstance(r, Task)]
        base = {"run": key, "since": start, "until": end,
                "queues": list(done.header.queues), "tasks": len(tasks),
                "computed_at": now, "current": None, "candidate": None, "ratios": {},
                "changes": [], "simulated": 0.0, "skipped": 0, "notes": []}
        if not tasks:
            return {**base, "status": "empty",
                    "message": f"no tasks in this window ({_iso(start)} to "
                               f"{_iso(end)}): nothing to replay"}, None
        outcome = self.whatif.replay(done.header, tasks, self.config, candidate=candidate)
        cur, cand = outcome.current, outcome.candidate
        return {**base, "status": "ok",
                "message": f"{len(tasks)} tasks replayed under the current settings and "
                           + ("the tuner's" if cand.source == "tuner" else "the candidate's"),
                "current": side_json(cur, key), "candidate": side_json(cand, key),
                "ratios": ratios(cand.total, cur.total),
                "changes": changes(cur.config, cand.config),
                "simulated": outcome.simulated, "skipped": outcome.skipped,
                "notes": list(outcome.notes)}, outcome
