"""What ``fleet tune`` searches: each queue's autoscaling plus the poll interval, within
bounds derived from the source config (docs/tuning.md, "Tuning").

The bounds are around what a team wrote, not absolute: a queue tuned for 2-minute
waits and one tuned for 10-second waits need windows of different magnitudes, and a
range that always contains the source's own value lets the source settings be the
first trial (so the search never recommends something worse than what runs today,
if what runs today meets the SLO). Durations are whole seconds (the poll interval
half seconds): a recommendation of ``cooldown: 37.4192s`` claims a precision no
simulation has, and reads badly in a queues.yaml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

from fleet.config import Autoscaling, FleetConfig
from fleet.units import format_duration


@dataclass(frozen=True)
class IntRange:
    """An integer parameter's bounds; ``log`` samples its magnitude (1..1000 evenly in
    decades rather than in units)."""

    low: int
    high: int
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Settings:
    """One point of the search: the poll interval and each tuned queue's autoscaling."""

    interval: float
    queues: dict[str, Autoscaling]

    def params(self) -> dict[str, float | int]:
        """As optuna's flat parameter names (``QUEUE.field``), for enqueue_trial."""
        out: dict[str, float | int] = {"interval": self.interval}
        for queue, scaling in self.queues.items():
            for field in FIELDS:
                value = getattr(scaling, field)
                out[f"{queue}.{field}"] = value if field in COUNTS else round(value)
        return out

    def fragment(self) -> dict:
        """The queues.yaml keys these settings set, as plain data (durations as text)."""
        return {"autoscaler": {"interval": format_duration(self.interval)},
                "queues": {q: {"autoscaling": s.model_dump(mode="json")}
                           for q, s in self.queues.items()}}

    def apply(self, config: FleetConfig) -> FleetConfig:
        """``config`` with these settings (unvalidated copy: each Autoscaling already
        is, and min <= max is kept by the bounds; TuneResult validates the winner)."""
        queues = {name: (cls.model_copy(update={"autoscaling": self.queues[name]})
                         if name in self.queues else cls)
                  for name, cls in config.queues.items()}
        autoscaler = config.autoscaler.model_copy(update={"interval": self.interval})
        return config.model_copy(update={"queues": queues, "autoscaler": autoscaler})


#: The Autoscaling fields searched, in the order they are suggested.
FIELDS = ("min_replicas", "max_replicas", "target_wait", "activation_threshold",
          "scale_up_stabilization", "scale_down_stabilization", "scale_down_step",
          "cooldown")
#: Those that are counts, not seconds.
COUNTS = ("min_replicas", "max_replicas", "activation_threshold", "scale_down_step")


@dataclass(frozen=True)
class SearchSpace:
    """Bounds per queue and field, and of the interval (half seconds)."""

    interval: tuple[float, float]
    queues: dict[str, dict[str, IntRange]]

    def suggest(self, trial: optuna.Trial) -> Settings:
        low, high = self.interval
        interval = trial.suggest_float("interval", low, high, step=0.5)
        return Settings(interval, {
            queue: Autoscaling(**{f: r.suggest(trial, f"{queue}.{f}") for f, r in fields.items()})
            for queue, fields in self.queues.items()})


def _around(value: float, low: int, high: int, *, log: bool = False) -> IntRange:
    """[low, high] widened to hold ``value`` (rounded), so the source is a point of it."""
    v = round(value)
    low, high = min(low, v), max(high, v)
    return IntRange(low, max(high, low), log=log and low >= 1)


def queue_space(scaling: Autoscaling, slo: float | None = None) -> dict[str, IntRange]:
    """One queue's bounds from its source settings.

    - min_replicas 0..max(1, source): warm replicas cost all day; more than a team
      asked for is never searched. max_replicas from half the source's (at least the
      min's upper bound, so min <= max always holds) to twice it: more room for
      bursts, bounded still by ``autoscaler.capacity``.
    - target_wait (what the policy drains the backlog within) from a quarter of the
      source's to four times it or twice the SLO, whichever is more, log-scaled (an
      SLO far above the source's target_wait is met by a policy that drains slower,
      with fewer replicas); activation_threshold 1..max(20, source).
    - scale_up_stabilization 0..max(60 s, 2 x source); scale_down_stabilization
      10 s..max(10 min, 2 x source), log (the window that costs or saves most);
      scale_down_step 1..max(4, source max); cooldown 0..max(2 min, 2 x source).
    """
    s = scaling
    min_high = max(1, s.min_replicas)
    max_low = max(min_high, math.ceil(s.max_replicas / 2), 1)
    return {
        "min_replicas": _around(s.min_replicas, 0, min_high),
        "max_replicas": _around(s.max_replicas, max_low, max(2 * s.max_replicas, max_low)),
        "target_wait": _around(s.target_wait, max(1, round(s.target_wait / 4)),
                               max(2, round(s.target_wait * 4), round(2 * (slo or 0))),
                               log=True),
        "activation_threshold": _around(s.activation_threshold, 1,
                                        max(20, s.activation_threshold), log=True),
        "scale_up_stabilization": _around(s.scale_up_stabilization, 0,
                                          max(60, round(2 * s.scale_up_stabilization))),
        "scale_down_stabilization": _around(s.scale_down_stabilization, 10,
                                            max(600, round(2 * s.scale_down_stabilization)),
                                            log=True),
        "scale_down_step": _around(s.scale_down_step, 1, max(4, s.max_replicas)),
        "cooldown": _around(s.cooldown, 0, max(120, round(2 * s.cooldown))),
    }


def search_space(config: FleetConfig, queues: list[str],
                 slo: dict[str, float] | None = None) -> SearchSpace:
    """The space for ``queues`` of ``config``; the interval 1 s..max(10 s, 2 x source)
    in half seconds (a shorter poll reacts sooner but costs a Redis round trip each, and
    simulates slower; past 10 s, a burst waits a whole poll before anything starts)."""
    source = config.autoscaler.interval
    low = max(0.5, min(1.0, math.floor(source * 2) / 2))
    high = max(10.0, math.ceil(source * 4) / 2)
    return SearchSpace((low, high), {q: queue_space(config.queues[q].autoscaling,
                                                    (slo or {}).get(q))
                                     for q in queues})


def source_settings(config: FleetConfig, queues: list[str]) -> Settings:
    """What ``config`` runs today, as a point of its own space (rounded as it is)."""
    def rounded(s: Autoscaling) -> Autoscaling:
        values = {f: getattr(s, f) if f in COUNTS else round(getattr(s, f)) for f in FIELDS}
        values["target_wait"] = max(1, values["target_wait"])
        return Autoscaling(**values)

    return Settings(max(0.5, round(config.autoscaler.interval * 2) / 2),
                    {q: rounded(config.queues[q].autoscaling) for q in queues})
