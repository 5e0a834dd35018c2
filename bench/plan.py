"""How much of everything a run does: the full run (about 4 to 5 minutes) or `--quick`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    rounds: int
    """Each measurement is repeated this many times, the servers taking turns; the best run of
    each server is kept (on a shared machine, noise only ever makes a run slower)."""
    sweep: tuple[int, ...]
    """Connections for the 1-event saturation sweep (the chart's x axis)."""
    sweep_s: float
    """Seconds per sweep point (less if the pool is answered sooner)."""
    batch_conns: tuple[int, ...]
    """Connections tried for 50-event POSTs; the best is reported."""
    e2e_conns: int
    rate: float
    rate_s: float
    events: int
    """Events per end-to-end run of this project (live and backlog)."""
    peer_events: int
    """Events per end-to-end run of the peer (arq is about 20x slower per event)."""
    users: int
    batch: int = 50

    @property
    def saturation_conns(self) -> int:
        """The sweep point whose latency the table quotes."""
        return 64 if 64 in self.sweep else self.sweep[-1]


FULL = Plan(
    name="full", rounds=2, sweep=(4, 16, 64, 256), sweep_s=3.0, batch_conns=(32, 64),
    e2e_conns=32, rate=2000.0, rate_s=5.0, events=150_000, peer_events=8_000, users=10_000,
)
QUICK = Plan(
    name="quick", rounds=1, sweep=(16, 64), sweep_s=2.0, batch_conns=(32,), e2e_conns=32,
    rate=2000.0, rate_s=2.0, events=40_000, peer_events=3_000, users=10_000,
)
