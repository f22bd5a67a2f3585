"""The statistics every decision uses (the report's intervals, the regression gate, --ci-target).

Throughput is a rate: its repetitions are compared on the log scale. A point's interval is the t-interval of
the mean log throughput (a geometric-mean interval, exp(mean +- t s / sqrt(n))); speed-up and efficiency
intervals are Welch t-intervals of the difference of mean logs between the N-GPU and the 1-GPU repetitions
(divided by N for efficiency). The gate's one-sided test is the same Welch test on logs. With one
repetition there is no interval (NaN), never a made-up one.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95


def _logs(x):
    x = np.asarray([v for v in x if v is not None and np.isfinite(v) and v > 0], float)
    return np.log(x)


def mean_ci(x, level=LEVEL):
    """(geometric mean, lo, hi) of positive samples; lo/hi NaN with fewer than two."""
    lx = _logs(x)
    if len(lx) == 0:
        return math.nan, math.nan, math.nan
    m = float(lx.mean())
    if len(lx) < 2:
        return math.exp(m), math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(lx) - 1) * lx.std(ddof=1) / math.sqrt(len(lx))
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def _welch(la, lb):
    va, vb = la.var(ddof=1) / len(la), lb.var(ddof=1) / len(lb)
    se = math.sqrt(va + vb)
    if se == 0:
        return 0.0, math.inf
    df = (va + vb) ** 2 / ((va ** 2 / (len(la) - 1)) + (vb ** 2 / (len(lb) - 1)))
    return se, df


def ratio_ci(a, b, level=LEVEL):
    """(ratio, lo, hi) of the geometric means of a over b, Welch t-interval on logs; NaN bounds with fewer
    than two samples on either side."""
    la, lb = _logs(a), _logs(b)
    if not len(la) or not len(lb):
        return math.nan, math.nan, math.nan
    d = float(la.mean() - lb.mean())
    if len(la) < 2 or len(lb) < 2:
        return math.exp(d), math.nan, math.nan
    se, df = _welch(la, lb)
    half = 0.0 if se == 0 else stats.t.ppf(0.5 + level / 2, df) * se
    return math.exp(d), math.exp(d - half), math.exp(d + half)


def p_less(base, cur):
    """One-sided p-value that the current rate is below the baseline's (Welch t-test on logs); NaN with
    fewer than two samples on either side."""
    lb, lc = _logs(base), _logs(cur)
    if len(lb) < 2 or len(lc) < 2:
        return math.nan
    se, df = _welch(lc, lb)
    d = float(lc.mean() - lb.mean())
    if se == 0:
        return 0.0 if d < 0 else 1.0
    return float(stats.t.cdf(d / se, df))


def relative_half_width(x, level=LEVEL):
    """Half the interval's width over its centre (0.03 = +-3 %); inf with fewer than two samples."""
    m, lo, hi = mean_ci(x, level)
    if not np.isfinite(lo):
        return math.inf
    return (hi - lo) / 2 / m


def steady_state(times, tolerance=0.25):
    """(first settled index, settled) of a point's measured step times. Steps at the start that are more
    than ``tolerance`` slower than the median of the second half are warm-up that had not settled
    (compilation, caches, clocks): they are not timed. A slow step later in the series is noise and stays.
    settled is False when more than half the steps are unsettled: the point never settled, its figure is over
    all steps and the report says so."""
    t = np.asarray(times, float)
    if len(t) < 4:
        return 0, True
    limit = float(np.median(t[len(t) // 2:])) * (1 + tolerance)
    lead = 0
    while lead < len(t) and t[lead] > limit:
        lead += 1
    if lead > len(t) / 2:
        return 0, False
    return lead, True
