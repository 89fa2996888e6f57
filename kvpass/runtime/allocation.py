"""Per-layer budgets at the same total memory: the allocation rule, and the calibration files
that carry it (measured by :mod:`kvpass.eval.sensitivity`, ``kvpass calibrate``; or the shares
one budget for the whole model gives, :mod:`kvpass.eval.shares`, ``kvpass calibrate --shares``).

The **allocation** gives layer i the multiplier ``a_i = clip(c * (s_i + mean(s)), low, high)`` of
the budget, ``s_i`` its sensitivity (negative values count as 0), with ``c`` chosen so that the
multipliers average 1: the same memory as the uniform budget. A layer where eviction costs
nothing weighs half as much as one of average sensitivity and keeps at least ``low``; ``high`` is
1 / budget (the whole prompt). The idea of per-layer budgets is PyramidKV's (Cai et al., arXiv
2406.02069), which fixes their shape in advance; here it is measured per model and policy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def check_fraction(budget) -> None:
    """A calibration is made at a fraction of the prompt in (0, 1)."""
    if isinstance(budget, bool) or not isinstance(budget, float) or not 0.0 < budget < 1.0:
        raise ValueError(f"calibrate at a fraction of the prompt in (0, 1), got {budget!r}")


def allocate(sens: list[float], budget: float, low: float = 0.25) -> tuple[float, ...]:
    """Multipliers of the budget, one per layer, averaging 1 (the module's docstring has the rule)."""
    if not sens:
        raise ValueError("no sensitivities: the model has no attention layers")
    high = 1.0 / budget
    s = [max(0.0, x) for x in sens]
    mean = sum(s) / len(s)
    if mean == 0.0:  # eviction hurt nowhere: nothing to move
        return tuple(1.0 for _ in s)
    w = [x + mean for x in s]

    def total(c: float) -> float:
        return sum(min(high, max(low, c * x)) for x in w)

    lo, hi = 0.0, len(w) / min(w)  # total(lo) <= n <= total(hi): bisect for the c that averages 1
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < len(w) else (lo, mid)
    return tuple(round(min(high, max(low, hi * x)), 4) for x in w)


def for_budget(result: dict, budget: int | float | None) -> tuple[float, ...]:
    """The allocation of a calibration ``result`` at ``budget``: a fraction, or (slots, or None) the
    calibration's own fraction, which then bounds the largest multiplier. Measured shares are used
    as they are (they belong to the budget they were measured at), capped at the whole prompt."""
    fraction = budget if isinstance(budget, float) else result["budget"]
    if "shares" in result:
        return tuple(min(1.0 / fraction, x) for x in result["shares"])
    return allocate(result["sensitivity"], fraction)


def read(knobs: dict, budget: int | float | None) -> dict:
    """``knobs`` with an ``allocation`` that names a ``kvpass calibrate`` file replaced by its
    multipliers at ``budget`` (:func:`for_budget`); other knobs as they are."""
    given = knobs.get("allocation")
    if not isinstance(given, (str, Path)):
        return knobs
    try:
        return {**knobs, "allocation": for_budget(load(given), budget)}
    except ValueError as e:
        raise ValueError(f"allocation {str(given)!r} is neither multipliers nor a calibration file: {e}") from None


def nearest(results: list[dict], budget: float) -> tuple[float, ...]:
    """The allocation at ``budget`` from whichever calibration in ``results`` was made nearest it."""
    return for_budget(min(results, key=lambda r: abs(r["budget"] - budget)), budget)


def save(result: dict, path: str | Path) -> Path:
    """Write a :func:`calibrate` result as JSON."""
    path = Path(path)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def load(path: str | Path) -> dict:
    """A calibration written by :func:`save`; a clear error for a missing, corrupt or foreign file."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no calibration file at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a kvpass calibration (not JSON: {e})") from None
    key = "shares" if isinstance(result, dict) and "shares" in result else "sensitivity"
    sens = result.get(key) if isinstance(result, dict) else None
    if (
        not isinstance(sens, list)
        or not sens
        or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in sens)
        or (key == "shares" and not all(x > 0 for x in sens))
        or not isinstance(result.get("budget"), float)
    ):
        raise ValueError(
            f"{path} is not a kvpass calibration (it needs 'sensitivity' (numbers) or 'shares' (positive numbers), "
            "and 'budget': a fraction)"
        )
    return result
