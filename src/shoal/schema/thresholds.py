"""Path-health thresholds: the RTT/loss bounds preflight refuses past and the monitor alerts on."""

from __future__ import annotations

from dataclasses import dataclass, field

from shoal.schema.report import InterfaceKind

# Absolute bounds per link kind: past these a path is degraded whatever its history, and
# preflight refuses it. A direct cable is sub-millisecond; a VPN crosses the internet.
KIND_BOUND_MS: dict[str, float] = {
    InterfaceKind.THUNDERBOLT: 5.0,
    InterfaceKind.ETHERNET: 10.0,
    InterfaceKind.VETH: 10.0,
    # Loopback never crosses a wire: past a few ms the host is CPU-starved, not the path bad.
    InterfaceKind.LOOPBACK: 20.0,
    InterfaceKind.WIFI: 50.0,
    InterfaceKind.BRIDGE: 50.0,
    InterfaceKind.VPN: 200.0,
    InterfaceKind.OTHER: 200.0,
}


@dataclass(frozen=True)
class Thresholds:
    degrade_factor: float = 3.0
    min_degrade_ms: float = 2.0  # 0.05 -> 0.2 ms is x4 and harmless
    window_s: float = 5.0  # the current window
    sustain_s: float = 3.0  # how long a shift must last before it counts
    down_after_s: float = 2.0  # no reply for this long while probing: down (as addressing's
    # FAILING_AFTER_S: the alert and the leader's move see the same cut)
    max_loss: float = 0.5  # preflight: more loss than this in the recent window refuses
    kind_bound_ms: dict[str, float] = field(default_factory=lambda: dict(KIND_BOUND_MS))

    def bound(self, kind: str) -> float:
        return self.kind_bound_ms.get(kind, self.kind_bound_ms.get(InterfaceKind.OTHER, 200.0))


def parse_bounds(text: str, base: Thresholds | None = None) -> Thresholds:
    """`vpn=20,ethernet=5` -> thresholds with those per-kind RTT bounds (ms) overridden."""
    base = base or Thresholds()
    bounds = dict(base.kind_bound_ms)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, value = part.partition("=")
        kinds = {k.value for k in InterfaceKind}
        if not sep or kind.strip() not in kinds:
            raise ValueError(f"{part!r}: write kind=ms with kind one of {', '.join(sorted(kinds))}")
        try:
            bounds[kind.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{part!r}: {value!r} is not a number of milliseconds") from None
    return Thresholds(**{**base.__dict__, "kind_bound_ms": bounds})
