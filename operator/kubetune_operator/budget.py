"""spec.budget against the accrued estimate (status.cost): how much of each limit is used, and
the words the condition and events use. Pure; decide.py acts on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .api import BudgetSpec

WARN_RATIO = 0.8  # BudgetNearlyExceeded, once per budget


@dataclass(frozen=True)
class Usage:
    """One limit of spec.budget and what the job has used of it."""

    field: str  # spec.budget.<field>
    limit: float
    used: float
    unit: str

    @property
    def ratio(self) -> float:
        return self.used / self.limit

    def describe(self) -> str:
        if self.unit == "USD":
            return f"estimated USD {self.used:.4f} of spec.budget.{self.field} {self.limit:g} ({self.ratio:.0%})"
        return f"{self.used:.4f} GPU-hours of spec.budget.{self.field} {self.limit:g} ({self.ratio:.0%})"


def limits(budget: BudgetSpec | None) -> dict[str, float]:
    """The limits set, by their spec field name (empty: no budget)."""
    if budget is None:
        return {}
    return budget.model_dump(by_alias=True, exclude_none=True)


def usages(budget: BudgetSpec | None, cost: dict[str, Any] | None) -> list[Usage]:
    """Each limit set, with the accrued amount it caps; the most used first."""
    cost = cost or {}
    found = []
    for name, limit in limits(budget).items():
        if name == "maxUsd":
            found.append(Usage(name, limit, float(cost.get("estimatedUsd") or 0), "USD"))
        else:
            found.append(Usage(name, limit, float(cost.get("gpuHours") or 0), "GPU-hours"))
    return sorted(found, key=lambda u: u.ratio, reverse=True)


def exceeded_message(worst: Usage) -> str:
    return (
        f"budget reached: {worst.describe()}; the job is suspended (its last checkpoint kept). "
        f"Raise or remove spec.budget.{worst.field} to resume"
    )


def nearly_exceeded_message(worst: Usage) -> str:
    return f"{worst.describe()} used; the job is suspended at 100%"
