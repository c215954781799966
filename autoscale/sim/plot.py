"""A simulation's figure: one row of panels per queue, drawn from its series (series.py).

Per queue, over simulated time: the backlog (messages waiting in the list, and held by
workers: running or prefetched), the replicas (ready, and starting, with the queue's
min/max_replicas dashed) and the wait (the oldest waiting message's age, with the
queue's target_wait dashed, and the p95 of the waits started between polls as dots).
Queues without tasks are left out (the title names them).

matplotlib is the optional extra ``fleet[tune]``: it is imported only here, when a
figure is drawn, and with the Agg canvas (no display, no global backend switched).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from autoscale.sim.errors import SimulationError
from autoscale.sim.series import QueueSeries, Series
from fleet.config import FleetConfig

#: The formats a figure is saved in, by the file's suffix.
FORMATS = {".png": "png", ".svg": "svg"}
INSTALL_HINT = "pip install 'fleet[tune]'"
#: A time axis's unit: the first whose limit the run's length is under.
_UNITS = ((600.0, "s", 1.0), (5 * 3600.0, "min", 60.0), (math.inf, "h", 3600.0))
#: Queues named in the title when left out (then "and N more").
_NAMED = 8
#: Rows up to which the layout is solved (constrained); beyond, fixed margins.
_SOLVED = 12


class PlotError(SimulationError):
    """A plot that cannot be made: matplotlib is missing, or the file's format."""


def time_unit(seconds: float) -> tuple[str, float]:
    """The unit of a time axis spanning ``seconds``: s below 10 min, min below 5 h,
    else h; and the seconds in one of it."""
    for limit, name, size in _UNITS:
        if seconds < limit:
            return name, size
    raise AssertionError("unreachable")


def format_of(path: str | Path) -> str:
    """``png`` or ``svg``, from the file's suffix; PlotError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise PlotError(f"{path}: a plot is a .png or .svg file")
    return FORMATS[suffix]


def require() -> None:
    """PlotError naming the extra when matplotlib cannot be imported."""
    _figure_class()


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "matplotlib":
            raise
        raise PlotError(f"plots need matplotlib, which is not installed here: "
                        f"{INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def figure(series: Series, config: FleetConfig, *, duration: float,
           title: str = "fleet simulate", active: Iterable[str] | None = None):
    """A matplotlib Figure of ``series``: queues in ``active`` (default: all) one row
    each, over 0..``duration`` simulated seconds."""
    Figure, Canvas = _figure_class()
    names = list(series.queues) if active is None else list(active)
    left_out = [n for n in series.queues if n not in set(names)]
    unit, size = time_unit(duration)
    rows = max(1, len(names))
    height = 1.0 + 2.6 * rows
    # constrained layout solves for every axis (seconds for 100 queues' 300): a few
    # rows get it, many get fixed margins in inches, which is what it would find.
    fig = Figure(figsize=(15, height), layout="constrained" if rows <= _SOLVED else None)
    if rows > _SOLVED:
        fig.subplots_adjust(left=0.05, right=0.99, wspace=0.2, top=1 - 1.1 / height,
                            bottom=0.5 / height, hspace=0.55)
    Canvas(fig)
    heading = title
    if left_out:
        shown = ", ".join(left_out[:_NAMED])
        more = f" and {len(left_out) - _NAMED} more" if len(left_out) > _NAMED else ""
        heading += f"\n(left out, no tasks: {shown}{more})"
    if rows > _SOLVED:  # at the top, not at 98% of a very tall figure
        fig.suptitle(heading, y=1 - 0.15 / height, va="top")
    else:
        fig.suptitle(heading)
    if not names:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no queue had tasks", ha="center", va="center")
        return fig
    # Not sharex: every axis gets the same limits anyway, and sharing costs n^2 in rows.
    axes = fig.subplots(rows, 3, squeeze=False)
    for row, name in zip(axes, names, strict=True):
        _row(row, series[name], config, unit, size, duration)
    return fig


def _row(axes, s: QueueSeries, config: FleetConfig, unit: str, size: float,
         duration: float) -> None:
    scaling = config.queues[s.name].autoscaling
    t = [x / size for x in s.time]
    backlog, replicas, wait = axes

    backlog.step(t, s.waiting, where="pre", label="waiting")
    backlog.step(t, s.held, where="pre", label="held by workers")
    backlog.set_title(f"{s.name}: backlog")
    backlog.set_ylabel("messages")

    replicas.step(t, s.ready, where="pre", label="ready")
    replicas.step(t, s.starting, where="pre", label="starting")
    replicas.axhline(scaling.min_replicas, color="grey", linestyle="--", linewidth=1,
                     label=f"min {scaling.min_replicas}")
    replicas.axhline(scaling.max_replicas, color="black", linestyle="--", linewidth=1,
                     label=f"max {scaling.max_replicas}")
    replicas.set_title(f"{s.name}: replicas")
    replicas.set_ylabel("replicas")
    replicas.yaxis.get_major_locator().set_params(integer=True)

    # Nothing waiting is no wait: 0, not a gap.
    ages = [0.0 if a is None else a for a in s.oldest]
    p95 = [math.nan if w is None else w for w in s.wait_p95]
    wunit, wsize = time_unit(max([scaling.target_wait, *ages,
                                  *(w for w in s.wait_p95 if w is not None)]))
    wait.step(t, [a / wsize for a in ages], where="pre", label="oldest waiting message")
    if any(w is not None for w in s.wait_p95):
        wait.plot(t, [w / wsize for w in p95], linestyle="none", marker=".", markersize=3,
                  label="p95 of waits started")
    wait.axhline(scaling.target_wait / wsize, color="red", linestyle="--", linewidth=1,
                 label=f"target_wait {scaling.target_wait:g}s")
    wait.set_title(f"{s.name}: wait")
    wait.set_ylabel(f"age ({wunit})")

    for ax in axes:
        ax.set_xlim(0, duration / size)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(f"simulated time ({unit})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")


def save(fig, paths: Iterable[str | Path]) -> None:
    """Write ``fig`` to each path, in the format of its suffix (text stays text in SVG:
    searchable, and smaller than glyph outlines)."""
    from matplotlib import rc_context

    for path in paths:
        fmt = format_of(path)
        with rc_context({"svg.fonttype": "none", "svg.hashsalt": "fleet"}):
            fig.savefig(path, format=fmt, dpi=100,
                        metadata={"Date": None} if fmt == "svg" else None)


def to_svg(fig) -> str:
    """``fig`` as an SVG document, with ``save``'s settings (for a page, not a file)."""
    from io import StringIO

    from matplotlib import rc_context

    out = StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "fleet"}):
        fig.savefig(out, format="svg", dpi=100, metadata={"Date": None})
    return out.getvalue()
