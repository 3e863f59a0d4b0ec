"""``drift``: how far each feature's distribution moved between two states of a view.

Both sides are summaries (``_stats``): a version or moment is the merged summary of its files
(no data read); an event-time range of the current table is read and summarised on the fly.
Numbers and times are compared by PSI over the reference's deciles and by the KS statistic
(the largest gap between the two CDFs); strings and booleans by PSI over the categories (a new
category counts: its reference share is taken as ``_EPS``) and a chi-square test, whose effect
size is Cramér's V. A feature is ``drifted`` when one of its effect sizes passes its threshold
*and* the difference is significant (p < ``P_VALUE``): an effect size alone flags noise in a few
hundred rows, a p-value alone flags every negligible change in millions.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from polarstore._definitions import FeatureView
from polarstore._offline import OfflineStore, collect
from polarstore._stats import FeatureSummary, Summary, summarize, summary_at

__all__ = ["CRAMERS_V", "KS", "PSI", "P_VALUE", "compare", "drift", "side_summary"]

PSI = 0.2  # population stability index: >= 0.2 is the customary "significant shift"
KS = 0.1  # Kolmogorov-Smirnov statistic: 10 percentage points of CDF apart somewhere
CRAMERS_V = 0.1  # chi-square effect size: Cohen's "small" effect
P_VALUE = 0.01  # and the difference must be unlikely to be sampling noise
_EPS = 1e-4  # the share given to an empty bin (a category new on one side)
_DECILES = [i / 10 for i in range(1, 10)]

Side = int | None | tuple[datetime, datetime]

_COLUMNS: dict[str, pl.DataType] = {
    "feature": pl.String(),
    "kind": pl.String(),
    "reference_count": pl.Int64(),
    "current_count": pl.Int64(),
    "psi": pl.Float64(),
    "ks": pl.Float64(),
    "chi2": pl.Float64(),
    "cramers_v": pl.Float64(),
    "p_value": pl.Float64(),
    "drifted": pl.Boolean(),
    "new_categories": pl.List(pl.String()),
}


def side_summary(offline: OfflineStore, view: FeatureView, side: Side) -> Summary:
    """The summary of one side: a version (None: current; -1: empty) or an event-time range
    ``(start, end)`` of the current table, start inclusive, end exclusive."""
    if not isinstance(side, tuple):
        return summary_at(offline, view, side)
    start, end = side
    ts = view.timestamp_field
    frame = offline.scan(view, columns=[ts, *view.feature_names], since=start, until=end)
    if frame is None:
        return summarize(pl.DataFrame(schema=dict(view.schema)), view)
    rows = collect(frame.filter(pl.col(ts) < end), view.name)
    return summarize(rows, view)


def drift(offline: OfflineStore, view: FeatureView, reference: Side, current: Side) -> pl.DataFrame:
    """``FeatureStore.drift``: one row per feature of ``view``."""
    return compare(
        side_summary(offline, view, reference), side_summary(offline, view, current), view
    )


def compare(reference: Summary, current: Summary, view: FeatureView) -> pl.DataFrame:
    """The drift table of two summaries of ``view``'s features."""
    rows = []
    for name in view.schema:
        r, c = reference.features[name], current.features[name]
        row: dict[str, Any] = {"feature": name, "kind": None}
        if r.kind in ("numeric", "temporal"):
            row |= {"kind": "numeric", "reference_count": r.n, "current_count": c.n}
            if r.n and c.n:
                row |= _numeric(r, c)
        elif r.kind == "categorical":
            row |= {"kind": "categorical", "reference_count": r.count, "current_count": c.count}
            if r.count and c.count:
                row |= _categorical(r, c)
        else:
            row |= {"reference_count": r.count, "current_count": c.count}
        rows.append(row)
    return pl.DataFrame(rows, schema=_COLUMNS)


def _psi(r: np.ndarray, c: np.ndarray) -> float:
    r, c = np.maximum(r, _EPS), np.maximum(c, _EPS)
    return float(np.sum((c - r) * np.log(c / r)))


def _numeric(r: FeatureSummary, c: FeatureSummary) -> dict[str, Any]:
    points = np.union1d(r.candidates(), c.candidates())
    ks = float(np.max(np.abs(r.cdf(points) - c.cdf(points))))
    edges = np.unique(np.asarray(r.quantiles(_DECILES), dtype=np.float64))
    bins_r = np.diff(np.concatenate([[0.0], r.cdf(edges), [1.0]]))
    bins_c = np.diff(np.concatenate([[0.0], c.cdf(edges), [1.0]]))
    psi = _psi(bins_r, bins_c)
    n = r.n * c.n / (r.n + c.n)
    p = _ks_p_value(ks, n)
    drifted = (psi >= PSI or ks >= KS) and p < P_VALUE
    return {"psi": psi, "ks": ks, "p_value": p, "drifted": drifted}


def _categorical(r: FeatureSummary, c: FeatureSummary) -> dict[str, Any]:
    names = sorted(set(r.values) | set(c.values))
    counts = np.array(
        [[r.values.get(k, 0) for k in names], [c.values.get(k, 0) for k in names]], dtype=float
    )
    if r.other or c.other:  # values beyond the counted ones: one more bin
        counts = np.hstack([counts, [[r.other], [c.other]]])
    totals = counts.sum(axis=1, keepdims=True)
    psi = _psi(counts[0] / totals[0], counts[1] / totals[1])
    used = counts[:, counts.sum(axis=0) > 0]
    expected = used.sum(axis=0) * totals / totals.sum()
    chi2 = float(np.sum((used - expected) ** 2 / expected))
    dof = used.shape[1] - 1
    p = _chi2_p_value(chi2, dof) if dof > 0 else 1.0
    v = math.sqrt(chi2 / totals.sum()) if dof > 0 else 0.0
    drifted = (psi >= PSI or v >= CRAMERS_V) and p < P_VALUE
    new = [k for k in names if k not in r.values and c.values.get(k)]
    return {
        "psi": psi,
        "chi2": chi2,
        "cramers_v": v,
        "p_value": p,
        "drifted": drifted,
        "new_categories": new,
    }


def _ks_p_value(d: float, n: float) -> float:
    """P(D >= d) for two samples of effective size ``n`` (Kolmogorov's limit, Stephens' fix)."""
    root = math.sqrt(n)
    lam = (root + 0.12 + 0.11 / root) * d
    if lam < 0.2:
        return 1.0
    total = sum((-1) ** (j - 1) * math.exp(-2.0 * j * j * lam * lam) for j in range(1, 101))
    return min(1.0, max(0.0, 2.0 * total))


def _chi2_p_value(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square of ``dof`` degrees: the regularised upper gamma Q(dof/2, x/2)."""
    a, x = dof / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:  # the series for P converges fast here
        term = total = 1.0 / a
        k = a
        while abs(term) > abs(total) * 1e-15:
            k += 1
            term *= x / k
            total += term
        return max(0.0, 1.0 - total * math.exp(log_front))
    # Lentz's continued fraction for Q
    b = x + 1 - a
    c, d = 1.0 / 1e-300, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        step = d * c
        h *= step
        if abs(step - 1) < 1e-15:
            break
    return min(1.0, h * math.exp(log_front))
