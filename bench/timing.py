"""What the single-machine bench scripts share: interleaved step timing and the load line.

    from timing import interleaved_step_times, load_line   # bench/ is on sys.path (the script's folder)
"""

from __future__ import annotations

import subprocess
import time


def interleaved_step_times(trainers: dict, rounds: int, steps: int) -> dict:
    """Seconds per `train_step()` of each trainer, one figure per round: one untimed warm-up
    step each, then `rounds` rounds, each running `steps` steps of every trainer in turn, so
    that load from other processes hits all of them alike."""
    for t in trainers.values():
        t.train_step()  # warm-up
    times = {k: [] for k in trainers}
    for _ in range(rounds):
        for k, t in trainers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                t.train_step()
            times[k].append((time.perf_counter() - t0) / steps)
    return times


def load_line() -> str:
    """`uptime`'s load averages, printed before and after a timing run."""
    return f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}"
