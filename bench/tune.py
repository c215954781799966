"""The tuner against KEDA: worker-seconds at equal or better wait p95, and the time to a
recommendation, on the synthetic trace suite (issue 11, item 6).

Per shape (steady, bursts, diurnal, spike, mixed; `fleet trace synth`'s defaults, one
hour, seed 1) and the shipped queues.yaml: the KEDA-like baseline is simulated first
(autoscale/sim/baselines.py), and its wait p95 on each queue becomes that queue's SLO
(never below ``--floor``: a p95 of 0, no wait at all, is no SLO anything can promise
to meet with fewer replicas). Then ``recommend`` tunes the fleet's policy for that SLO
with its defaults (60 trials, seed 0), and the tuned settings' figures are set beside
KEDA's: worker-hours, their ratio (tuned / KEDA; the goal is <= 0.75, "at least 25 %
fewer"), the work floor as a fraction of KEDA's (``work/KEDA``: the tasks' own service
time on the queues' slots, which no autoscaler gets under, so a ratio above 0.75 there
puts the goal out of reach), the p95 of each queue, and the wall time of the whole tune
(its two reference runs included). The fleet's untouched settings are shown too.

Run from the repository root:  python bench/tune.py [--hours H] [--trials N] [--floor S]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoscale.sim.baselines import KedaController, work_floor
from autoscale.sim.engine import Simulation
from autoscale.sim.tune import recommend
from bench.common import ROOT, machine
from fleet.config import parse_config
from fleet.trace.synth import synthesize

SHAPES = ("steady", "bursts", "diurnal", "spike", "mixed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor", type=float, default=1.0,
                        help="The least SLO of a queue, seconds (KEDA's p95 may be 0).")
    args = parser.parse_args()
    path = ROOT / "queues.yaml"
    config = parse_config(yaml.safe_load(path.read_text()), str(path))
    print(machine())
    print(f"shipped queues.yaml, {args.hours:g}h per shape, {args.trials} trials, seed "
          f"{args.seed}, start-up local (3 s); SLO per queue = max(KEDA's p95, "
          f"{args.floor:g}s)")
    print(f"{'shape':<8} {'tasks':>6} {'KEDA w-h':>9} {'current':>8} {'tuned':>7} "
          f"{'tuned/KEDA':>10} {'work/KEDA':>10}  {'wait p95 per queue: KEDA -> tuned':<44} "
          f"{'met':>4} {'tune wall':>9}")
    ratios = []
    for shape in SHAPES:
        header, stream = synthesize(shape, {}, duration=args.hours * 3600, seed=1,
                                    queues=list(config.queues))
        tasks = list(stream)
        used = [q for q in header.queues if any(t.queue == q for t in tasks)]
        keda = Simulation(header, tasks, config, controller=KedaController(config),
                          seed=args.seed).run()
        slo = {q: max(args.floor, keda.queues[q].waits.quantile(0.95)) for q in used}
        began = time.perf_counter()
        result = recommend(header, tasks, config, slo_wait_p95=slo, trials=args.trials,
                           seed=args.seed)
        wall = time.perf_counter() - began
        chosen = result.best or result.closest
        ratio = chosen.worker_seconds / result.keda.worker_seconds
        ratios.append(ratio)
        # The least any autoscaler could spend on these tasks (baselines.work_floor).
        least = sum(work_floor(tasks, config).values()) / result.keda.worker_seconds
        waits = ", ".join(f"{q} {result.keda.queues[q].wait_p95:.1f}->"
                          f"{chosen.queues[q].wait_p95:.1f}s" for q in used)
        print(f"{shape:<8} {len(tasks):>6,} {result.keda.worker_seconds / 3600:>9.2f} "
              f"{result.current.worker_seconds / 3600:>8.2f} "
              f"{chosen.worker_seconds / 3600:>7.2f} {ratio:>9.2f}x {least:>9.2f}x  {waits:<44} "
              f"{'yes' if result.best else 'NO':>4} {wall:>8.1f}s")
    mean = sum(ratios) / len(ratios)
    print(f"tuned / KEDA worker-seconds: {min(ratios):.2f}x to {max(ratios):.2f}x, mean "
          f"{mean:.2f}x ({(1 - mean) * 100:.0f} % fewer on average; goal >= 25 % fewer)")


if __name__ == "__main__":
    main()
