"""Strict mode's settings: one frozen dataclass, defaults in one place, validation that names the key.

The time bounds every safety argument of strict mode uses are derived here, once:
``safe(d) = d * (1 + rho) / (1 - rho)`` is how long a process must wait on its own clock to be sure
that a span ``d`` measured on any other clock (drift at most ``rho``) has passed in real time.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StrictSettings", "StrictSettingsError"]

MIN_LEASE_GOSSIPS = 3  # a lease must outlive this many gossip intervals, or renewals cannot keep up


class StrictSettingsError(ValueError):
    """A strict-mode setting is out of range; names the key and what was expected."""

    def __init__(self, key: str, expected: str, got: object) -> None:
        self.key, self.expected, self.got = key, expected, got
        super().__init__(f"key 'strict.{key}': expected {expected}, got {got!r}")


@dataclass(frozen=True, slots=True)
class StrictSettings:
    alpha: float = 0.2  # share of each node's weight that is pinned: minted with no lease, kept in a minority
    lease_ms: float = 500.0  # L: a floating lease lasts this long from its request's send time
    rho: float = 1e-3  # bound on any clock's drift rate against real time
    gossip_interval_ms: float = 20.0  # the gossip round; transfers and wants ride on it
    transfer_window_ms: float = 0.0  # a transfer is credited only this soon after its want (0: 4 rounds)
    renew_ms: float = 0.0  # a lease is renewed this often (0: lease / 4)
    voter_dead_ms: float = 0.0  # a voter silent this long is voted out of the quorum (0: 2 leases)

    def __post_init__(self) -> None:
        def bad(key: str, expected: str, got: object) -> None:
            raise StrictSettingsError(key, expected, got)

        for key in ("alpha", "lease_ms", "rho", "gossip_interval_ms", "transfer_window_ms", "renew_ms",
                    "voter_dead_ms"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                bad(key, "a number", value)
        if not 0.0 <= self.alpha <= 1.0:
            bad("alpha", "a number in [0, 1]", self.alpha)
        if not 0.0 <= self.rho < 0.1:
            bad("rho", "a drift bound in [0, 0.1)", self.rho)
        if not self.gossip_interval_ms > 0:
            bad("gossip_interval_ms", "a number > 0", self.gossip_interval_ms)
        least = MIN_LEASE_GOSSIPS * self.gossip_interval_ms
        if not self.lease_ms >= least:
            bad("lease_ms", f"a lease of at least {MIN_LEASE_GOSSIPS} gossip intervals (>= {least:g} ms)",
                self.lease_ms)
        if self.transfer_window_ms < 0 or self.transfer_window_ms >= self.lease_ms:
            bad("transfer_window_ms", f"0 (auto) or a window in (0, lease_ms = {self.lease_ms:g})",
                self.transfer_window_ms)
        if self.transfer_window_ms and self.transfer_window_ms < self.gossip_interval_ms:
            bad("transfer_window_ms", f"at least one gossip interval ({self.gossip_interval_ms:g} ms)",
                self.transfer_window_ms)
        if self.renew_ms < 0 or self.renew_ms >= self.lease_ms:
            bad("renew_ms", f"0 (auto) or an interval in (0, lease_ms = {self.lease_ms:g})", self.renew_ms)
        if self.voter_dead_ms < 0:
            bad("voter_dead_ms", "0 (auto) or a number > 0", self.voter_dead_ms)

    # ------------------------------------------------------------- derived, in seconds

    @property
    def lease_s(self) -> float:
        return self.lease_ms / 1000

    @property
    def gossip_s(self) -> float:
        return self.gossip_interval_ms / 1000

    @property
    def transfer_window_s(self) -> float:
        return (self.transfer_window_ms or min(4 * self.gossip_interval_ms, self.lease_ms / 2)) / 1000

    @property
    def renew_s(self) -> float:
        return (self.renew_ms or self.lease_ms / 4) / 1000

    @property
    def voter_dead_s(self) -> float:
        return (self.voter_dead_ms or 2 * self.lease_ms) / 1000

    def safe(self, span_s: float) -> float:
        """Wait this long on our clock to be sure ``span_s`` of another clock has passed for real."""
        return span_s * (1 + self.rho) / (1 - self.rho)

    @property
    def reclaim_s(self) -> float:
        """How long a voter counts a grant: L * (1 + rho) / (1 - rho) from granting it."""
        return self.safe(self.lease_s)

    @property
    def ghost_s(self) -> float:
        """After this long (own clock) no transfer sent before ``now`` can still be credited."""
        return self.safe(self.transfer_window_s)

    @property
    def mint_scale(self) -> float:
        """Mint per second of our own clock: a clock fast by ``rho`` must not mint more than ``R``."""
        return 1 / (1 + self.rho)
