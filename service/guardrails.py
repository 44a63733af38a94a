"""Guardrails: thresholds an edit must keep, checked on the live model right after it.

- ``min_agreement``: the share of locality probes whose top next token is still the original's;
- ``max_delta_growth``: how much one edit may raise any edited layer's mean |W - W0|, as a share
  of that layer's mean |W0|;
- ``max_perplexity_ratio``: held-out perplexity of the edited model over the original's.

An edit that breaches one is rolled back and marked ``rejected`` (action ``reject``), or kept
and flagged (action ``flag``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from service.probes import ProbeReport

Action = Literal["reject", "flag"]
Norms = dict[str, dict[int, float]]  # "mean_abs_w" / "mean_abs_delta" -> layer -> value


@dataclass(frozen=True)
class Breach:
    guardrail: str  # agreement, delta_growth or perplexity_ratio
    value: float
    limit: float

    def describe(self) -> str:
        if self.guardrail == "agreement":
            return f"probe top-1 agreement {self.value:.4f} is below the minimum {self.limit}"
        if self.guardrail == "delta_growth":
            return (
                f"mean |W - W0| grew by {self.value:.3g} of mean |W0| in one layer; "
                f"the most allowed is {self.limit}"
            )
        return f"held-out perplexity ratio {self.value:.4f} is above the maximum {self.limit}"

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


@dataclass(frozen=True)
class Guardrails:
    min_agreement: float | None = None
    max_delta_growth: float | None = None
    max_perplexity_ratio: float | None = None
    action: Action = "reject"

    @property
    def active(self) -> bool:
        return any(
            v is not None
            for v in (self.min_agreement, self.max_delta_growth, self.max_perplexity_ratio)
        )

    @property
    def rejects(self) -> bool:
        """Whether a breach undoes the edit (so it must be checked before anyone sees it)."""
        return self.active and self.action == "reject"

    def check(
        self, report: ProbeReport | None, before: Norms, after: Norms, w0_mean: dict[int, float]
    ) -> list[Breach]:
        measured: dict[str, tuple[float | None, float | None, int]] = {
            # guardrail: (value, limit, +1 when the value must stay at or below the limit)
            "agreement": (report.agreement if report else None, self.min_agreement, -1),
            "delta_growth": (delta_growth(before, after, w0_mean), self.max_delta_growth, 1),
            "perplexity_ratio": (
                report.perplexity_ratio if report else None,
                self.max_perplexity_ratio,
                1,
            ),
        }
        breaches = []
        for name, (value, limit, sign) in measured.items():
            if value is not None and limit is not None and sign * (value - limit) > 0:
                breaches.append(Breach(name, value, limit))
        return breaches


def delta_growth(before: Norms, after: Norms, w0_mean: dict[int, float]) -> float:
    """The largest rise of one layer's mean |W - W0|, relative to its mean |W0|."""
    old = before.get("mean_abs_delta", {})
    new = after.get("mean_abs_delta", {})
    return max(
        ((value - old.get(layer, 0.0)) / w0_mean[layer] for layer, value in new.items()),
        default=0.0,
    )
