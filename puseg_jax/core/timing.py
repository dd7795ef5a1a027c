"""Where a run's wall time goes: seconds per phase, written to `<workdir>/timing.json`.

The trainer times its phases (setup, the first call that compiles, the train steps, the input
pipeline's share, checkpoints, periodic and final evaluation, writing) so that every run says
what its time was spent on (benchmarks/README.md, "Where a run's time goes"). JAX dispatches
asynchronously: a phase's seconds are the host's wall time in it, and the device work of the
train steps is counted where the host waits for it (the log and checkpoint fetches, which are
inside the 'train steps' phase).
"""

import contextlib
import json
import os
import time
from collections.abc import Iterator

TIMING_FILE = "timing.json"


class PhaseTimer:
    """Accumulates wall seconds per named phase; phases may repeat (each checkpoint, each eval).

    `inside` names phases measured within another one (the input pipeline within the train
    steps): they are reported but not added to the total a second time.
    """

    def __init__(self, inside: dict[str, str] | None = None):
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.inside = dict(inside or {})
        self.start = time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def summary(self) -> dict:
        """{'total_s', 'phases': {name: {'seconds', 'count', 'share', ['inside']}}}; 'other' is
        the wall time outside every timed phase."""
        total = time.perf_counter() - self.start
        phases = {}
        for name, s in self.seconds.items():
            phases[name] = {"seconds": s, "count": self.counts[name], "share": s / total}
            if name in self.inside:
                phases[name]["inside"] = self.inside[name]
        outside = sum(s for n, s in self.seconds.items() if n not in self.inside)
        phases["other"] = {"seconds": total - outside, "count": 1, "share": 1 - outside / total}
        return {"total_s": total, "phases": phases}

    def line(self) -> str:
        """One console line: total and the phases, largest first."""
        s = self.summary()
        parts = [
            f"{name} {p['seconds']:.0f} s" + (f" (in {p['inside']})" if "inside" in p else "")
            for name, p in sorted(s["phases"].items(), key=lambda kv: -kv[1]["seconds"])
            if p["seconds"] >= 0.5
        ]
        return f"[timing] {s['total_s']:.0f} s: " + ", ".join(parts)

    def write(self, workdir: str) -> dict:
        summary = self.summary()
        with open(os.path.join(workdir, TIMING_FILE), "w") as f:
            json.dump(summary, f, indent=1)
        return summary
