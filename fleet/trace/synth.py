"""Synthetic traces of named shapes: pure functions of (shape, parameters, duration, seed).

A shape says when tasks arrive (``steady``, ``bursts``, ``diurnal``, ``spike``,
``heavy-tailed``, ``mixed``); a service option says how long each runs (``lognormal``,
``pareto``, ``exponential``, ``constant``) and goes with any shape. Arrivals and service
times draw from two generators seeded apart, so the same seed gives the same arrival
times whatever service distribution is chosen, and a comparison of two policies on one
seed compares like with like. ``random.Random`` is seeded from a string, which Python
hashes with SHA-512 (not the per-process salted ``hash``): the same seed gives the same
trace on every machine and Python version that keeps ``random``'s generator.

Parameters arrive as text from the command line (``-p rate=2``, ``-p every=5m``) or as
values from code; each is parsed and checked before anything is generated, and a wrong
one is named with the shape and what it accepts.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import FleetError
from fleet.trace.model import VERSION, Header, Task
from fleet.units import parse_duration

#: The queues of the shipped queues.yaml, for code that has no config at hand.
SHIPPED_QUEUES = ("default", "io", "heavy", "xl")
SERVICES = ("lognormal", "pareto", "exponential", "constant")
#: Each service distribution's own parameters.
SERVICE_PARAMS = {"lognormal": ("median", "sigma"), "pareto": ("scale", "alpha"),
                  "exponential": ("mean",), "constant": ("seconds",)}


class SynthError(FleetError):
    """A shape or a parameter that synth does not know, or a value it cannot use."""

    exit_code = 2


# -- parameter parsers: text or a value -> a checked value, or ValueError saying why ----

def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def positive(value: object) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return number


def non_negative(value: object) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return number


def _duration(value: object, zero: bool) -> float:
    if isinstance(value, str) and _is_number(value):
        value = float(value)
    number = parse_duration(value)  # ValueError naming the accepted forms
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        raise ValueError(f"must be {'>=' if zero else '>'} 0 and finite, got {value!r}")
    return number


def seconds(value: object) -> float:
    """A duration (``30s``, ``5m``, ``1h30m`` or a number of seconds), > 0."""
    return _duration(value, zero=False)


def non_negative_seconds(value: object) -> float:
    return _duration(value, zero=True)


def count(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"expected a whole number >= 1, got {value!r}") from None
    if number != int(number) or number < 1:
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    return int(number)


def name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty name, got {value!r}")
    return value.strip()


def alpha(value: object) -> float:
    number = _number(value)
    if number < 0.1:  # below, the largest draws overflow a float
        raise ValueError(f"must be >= 0.1, got {value!r}")
    return number


def service_name(value: object) -> str:
    if value not in SERVICES:
        raise ValueError(f"expected one of {', '.join(SERVICES)}, got {value!r}")
    return str(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Param:
    default: Any
    parse: Callable[[object], Any]
    doc: str
    #: The value is a queue name, checked against the trace's queues.
    queue: bool = False


#: Service parameters every shape takes (a shape may change their defaults).
SERVICE = {
    "service": Param("lognormal", service_name, "service-time distribution: "
                     + ", ".join(SERVICES)),
    "median": Param(1.0, positive, "lognormal: median service time, seconds"),
    "sigma": Param(0.5, positive, "lognormal: sigma of the log of service times"),
    "scale": Param(1.0, positive, "pareto: the smallest service time, seconds"),
    "alpha": Param(1.5, alpha, "pareto: tail index (smaller: heavier; <= 1: no mean)"),
    "mean": Param(1.0, positive, "exponential: mean service time, seconds"),
    "seconds": Param(1.0, positive, "constant: every task's service time, seconds"),
}
TARGET = {
    "queue": Param("default", name, "the queue every task goes to", queue=True),
    "task": Param("synthetic", name, "the task name"),
}


@dataclass(frozen=True)
class Shape:
    name: str
    doc: str
    #: The shape's own parameters (arrivals and targets).
    own: Mapping[str, Param]
    #: (parameters, duration, seed) -> tasks, ordered by sent.
    generate: Callable[[dict[str, Any], float, int], Iterator[Task]]
    #: Defaults of SERVICE or TARGET that this shape changes.
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def params(self) -> dict[str, Param]:
        merged = {**TARGET, **self.own, **SERVICE}
        for key, value in self.defaults.items():
            merged[key] = Param(value, merged[key].parse, merged[key].doc, merged[key].queue)
        return merged


def synthesize(shape: str, params: Mapping[str, object] | None = None, *,
               duration: float = 3600.0, seed: int = 0,
               queues: Sequence[str] = SHIPPED_QUEUES) -> tuple[Header, Iterator[Task]]:
    """A trace's header and its tasks (lazily, ordered by ``sent``), for ``shape`` with
    ``params`` over ``duration`` seconds. Parameters are checked now; a wrong one raises
    ``SynthError`` before anything is generated."""
    if shape not in SHAPES:
        raise SynthError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")
    kind = SHAPES[shape]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SynthError(f"{shape}: seed: expected a whole number, got {seed!r}")
    try:
        duration = seconds(duration)
    except ValueError as exc:
        raise SynthError(f"{shape}: duration: {exc}") from None
    values = resolve(kind, dict(params or {}), list(queues))
    header = Header(version=VERSION, source=f"synth:{shape}", duration=duration,
                    queues=list(queues), params={"shape": shape, **values, "seed": seed})
    return header, kind.generate(values, duration, seed)


def resolve(shape: Shape, given: dict[str, object], queues: list[str]) -> dict[str, Any]:
    """Every parameter of ``shape``: the given ones parsed, the rest at their defaults;
    those of a service distribution other than the chosen one are left out (and refused
    if given)."""
    spec = shape.params()
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise SynthError(f"{shape.name}: unknown parameter{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; its parameters: "
                         f"{', '.join(spec)}")
    values: dict[str, Any] = {}
    for key, param in spec.items():
        raw = given.get(key, param.default)
        try:
            values[key] = param.parse(raw)
        except ValueError as exc:
            raise SynthError(f"{shape.name}: {key}: {exc}") from None
        if param.queue and values[key] not in queues:
            raise SynthError(f"{shape.name}: {key}: {values[key]!r} is not a queue of "
                             f"the config ({', '.join(queues)})")
    chosen = values["service"]
    for other, keys in SERVICE_PARAMS.items():
        if other == chosen:
            continue
        for key in keys:
            if key in given:
                raise SynthError(f"{shape.name}: {key} applies to service={other}, "
                                 f"not service={chosen}")
            del values[key]
    if check := CHECKS.get(shape.name):
        check(values)
    return values


# -- service times ----------------------------------------------------------------

def service_sampler(values: Mapping[str, Any], rng: random.Random) -> Callable[[], float]:
    kind = values["service"]
    if kind == "lognormal":
        mu, sigma = math.log(values["median"]), values["sigma"]
        return lambda: rng.lognormvariate(mu, sigma)
    if kind == "pareto":
        scale, tail = values["scale"], values["alpha"]
        return lambda: scale * rng.paretovariate(tail)
    if kind == "exponential":
        rate = 1.0 / values["mean"]
        return lambda: rng.expovariate(rate)
    constant = values["seconds"]
    return lambda: constant


def _tasks(arrivals: Iterator[float], queue: str, task: str,
           service: Callable[[], float]) -> Iterator[Task]:
    for sent in arrivals:
        yield Task(queue=queue, name=task, sent=round(sent, 6), service=round(service(), 6))


def _rngs(seed: int, stream: str) -> tuple[random.Random, random.Random]:
    return (random.Random(f"{seed}:{stream}:arrivals"),
            random.Random(f"{seed}:{stream}:service"))


def _single(arrivals: Callable[[dict[str, Any], float, random.Random], Iterator[float]]):
    """A shape whose tasks all go to one queue with one service distribution."""
    def generate(values: dict[str, Any], duration: float, seed: int) -> Iterator[Task]:
        arrive, serve = _rngs(seed, "main")
        return _tasks(arrivals(values, duration, arrive), values["queue"], values["task"],
                      service_sampler(values, serve))
    return generate


# -- arrivals: (parameters, duration, rng) -> sent times, ascending, in [0, duration) ----

def poisson(rate: float, duration: float, rng: random.Random) -> Iterator[float]:
    t = rng.expovariate(rate)
    while t < duration:
        yield t
        t += rng.expovariate(rate)


def _steady(v: dict[str, Any], duration: float, rng: random.Random) -> Iterator[float]:
    return poisson(v["rate"], duration, rng)


def _bursts(v: dict[str, Any], duration: float, rng: random.Random) -> Iterator[float]:
    """``chunks`` sends spread evenly over ``spread`` seconds, every ``every`` seconds
    from t=0: what ``fleet submit`` does with a job (it publishes chunks in pipelined
    batches, a few thousand a second)."""
    n, every, spread = v["chunks"], v["every"], v["spread"]
    at = 0.0
    while at < duration:
        for i in range(n):
            t = at + spread * i / n
            if t >= duration:
                break
            yield t
        at += every


def diurnal_rate(v: Mapping[str, Any], t: float) -> float:
    """min_rate at t=0, max_rate at period/2, a cosine between."""
    low, high = v["min_rate"], v["max_rate"]
    return low + (high - low) * (1 - math.cos(2 * math.pi * t / v["period"])) / 2


def _diurnal(v: dict[str, Any], duration: float, rng: random.Random) -> Iterator[float]:
    # Lewis and Shedler's thinning: a Poisson process at the peak rate, each arrival
    # kept with probability rate(t) / peak, is a Poisson process at rate(t).
    peak = v["max_rate"]
    for t in poisson(peak, duration, rng):
        if rng.random() * peak < diurnal_rate(v, t):
            yield t


def _spike(v: dict[str, Any], duration: float, rng: random.Random) -> Iterator[float]:
    # Dropping a stretch of a Poisson process leaves a Poisson process on the rest.
    quiet_from, quiet_to = v["at"], v["at"] + v["gap"]
    for t in poisson(v["rate"], duration, rng):
        if not quiet_from <= t < quiet_to:
            yield t


def _mixed(values: dict[str, Any], duration: float, seed: int) -> Iterator[Task]:
    arrive, serve = _rngs(seed, "short")
    short = _tasks(poisson(values["rate"], duration, arrive), values["queue"],
                   values["task"], service_sampler(values, serve))
    arrive, serve = _rngs(seed, "heavy")
    heavy_service = {"service": "pareto", "scale": values["heavy_scale"],
                     "alpha": values["heavy_alpha"]}
    heavy = _tasks(poisson(values["heavy_rate"], duration, arrive), values["heavy_queue"],
                   values["heavy_task"], service_sampler(heavy_service, serve))
    return heapq.merge(short, heavy, key=lambda task: task.sent)


def _check_diurnal(v: dict[str, Any]) -> None:
    if v["min_rate"] > v["max_rate"]:
        raise SynthError(f"diurnal: min_rate ({v['min_rate']:g}) is above max_rate "
                         f"({v['max_rate']:g})")


def _check_bursts(v: dict[str, Any]) -> None:
    if v["spread"] >= v["every"]:  # a burst would still be sending when the next starts
        raise SynthError(f"bursts: spread ({v['spread']:g}s) must be shorter than every "
                         f"({v['every']:g}s)")


RATE = Param(1.0, positive, "arrivals per second (Poisson)")
SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("steady", "Poisson arrivals at a constant rate", {"rate": RATE}, _single(_steady)),
    Shape("bursts", "a batch of chunks every so often, as fleet submit sends a job", {
        "chunks": Param(100, count, "tasks per burst"),
        "every": Param(60.0, seconds, "seconds from one burst to the next"),
        "spread": Param(1.0, non_negative_seconds, "seconds over which a burst is sent"),
    }, _single(_bursts)),
    Shape("diurnal", "Poisson arrivals at a rate that swings between min and max", {
        "min_rate": Param(0.1, non_negative, "the rate at t=0 and every period after"),
        "max_rate": Param(1.0, positive, "the rate at period/2"),
        "period": Param(3600.0, seconds, "seconds of one cycle (a day is 24h)"),
    }, _single(_diurnal)),
    Shape("spike", "a steady rate, silence for a while, then the rate again", {
        "rate": RATE,
        "at": Param(600.0, non_negative_seconds, "when the silence starts"),
        "gap": Param(600.0, seconds, "how long it lasts"),
    }, _single(_spike)),
    Shape("heavy-tailed", "steady arrivals of tasks with Pareto service times", {
        "rate": Param(0.5, positive, RATE.doc),
    }, _single(_steady), {"service": "pareto", "scale": 5.0, "alpha": 1.5,
                          "queue": "heavy", "task": "synthetic.heavy"}),
    Shape("mixed", "short tasks on one queue and heavy ones on another", {
        "rate": Param(2.0, positive, "short tasks per second"),
        "heavy_rate": Param(0.05, positive, "heavy tasks per second"),
        "heavy_queue": Param("heavy", name, "the heavy tasks' queue", queue=True),
        "heavy_task": Param("synthetic.heavy", name, "the heavy tasks' name"),
        "heavy_scale": Param(30.0, positive, "heavy tasks: Pareto scale, seconds"),
        "heavy_alpha": Param(1.5, alpha, "heavy tasks: Pareto tail index"),
    }, _mixed, {"median": 0.2, "task": "synthetic.short"}),
)}
CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {"diurnal": _check_diurnal,
                                                        "bursts": _check_bursts}
