"""A sweep's plot: each run's best eval metric against every value the sweep varies, one small panel per key.

    sweep_plot(results, "runs/x/sweep.svg")   # -> Path, or None when no config key varies across the runs

The swept keys are read off the runs' resolved configs (``RunResult.config``; the method's options as
``model.<key>``): a key whose value differs between runs gets a panel. A numeric key whose positive values span
more than :data:`LOG_SPAN` gets a log axis (learning rates); any other key a categorical one, its values in
order (panels in the order the runs' sweep names list the keys). Runs a search pruned are drawn hollow and grey
and named in the legend; the mean of the trained-out runs at each value is a line (numeric values) or a dash
(other categories). Plain SVG written by hand (no plotting library); each point's tooltip names its run.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape, quoteattr

from unipt.train import MODEL_PREFIX, RunResult

LOG_SPAN = 20.0
"""A numeric key gets a log axis when its values are positive and the largest is more than this times the least."""

_PANEL_W, _PANEL_H = 250, 210  # one panel, margins included
_LEFT, _RIGHT, _TOP, _BOTTOM = 54, 12, 12, 58  # margins of a panel's plot area
_HEADER, _LEGEND_ROW = 50, 16
_FONT = "DejaVu Sans, Verdana, Arial, sans-serif"
_BLUE, _GREY, _GRID, _TEXT = "#1f77b4", "#7f7f7f", "#b0b0b0", "#222222"
_MAX_PRUNED_LISTED = 12
_LOWER_IS_BETTER = ("loss", "rmse")


@dataclass
class _Point:
    run: RunResult
    value: Any  # the swept key's value
    y: float
    pruned: bool


def sweep_plot(results: Sequence[RunResult], path: str | Path, *, metric: str | None = None) -> Path | None:
    """Write the SVG of ``results``' best eval ``metric`` (default: the metric that picked their best epochs)
    against each config key that varies across them to ``path``; None (nothing written) when no key varies."""
    keys = varying_keys(results)
    if not keys:
        return None
    metric = metric or results[0].select_metric
    scored = [r for r in results if _score(r, metric) is not None]
    if not scored:
        available = sorted({m for r in results for m in r.eval_metrics})
        raise ValueError(f"no run has an eval metric {metric!r} to plot; the runs have {available or 'none'} "
                         f"(a run without an eval split has none)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_svg(results, scored, keys, metric), encoding="utf-8")
    return path


def varying_keys(results: Sequence[RunResult]) -> list[str]:
    """The config keys whose values differ across ``results`` (``model.<key>`` for the method's options): in
    the order the runs' sweep names give them (``unipt@lr=0.001,seed=0``), then in the configs' order."""
    flat = [_flatten(r.config) for r in results]
    keys = list(dict.fromkeys(k for config in flat for k in config))
    varying = [k for k in keys if len({_key(c.get(k)) for c in flat}) > 1]
    named = list(dict.fromkeys(item.partition("=")[0] for r in results
                               for item in r.name.partition("@")[2].split(",") if "=" in item))
    return sorted(varying, key=lambda k: named.index(k) if k in named else len(named) + keys.index(k))


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "model" and isinstance(value, dict):
            out.update({f"{MODEL_PREFIX}{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _score(result: RunResult, metric: str) -> float | None:
    value = result.eval_metrics.get(metric)
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


# ----------------------------------------------------------------------------- drawing
def _svg(results: Sequence[RunResult], scored: list[RunResult], keys: list[str], metric: str) -> str:
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    pruned = [r for r in scored if r.pruned_at is not None]
    listed = pruned[:_MAX_PRUNED_LISTED]
    legend_lines = 1 + (1 + len(listed) + (len(pruned) > len(listed)) if pruned else 0)
    width = max(cols * _PANEL_W, 60 + 6.2 * max([len(_pruned_label(r)) for r in listed] + [60]))
    height = _HEADER + rows * _PANEL_H + 12 + legend_lines * _LEGEND_ROW + 8
    splits = {r.config.get("eval_split") for r in scored}
    y_label = f"{splits.pop()} {metric}" if len(splits) == 1 and None not in splits else f"eval {metric}"
    lower = metric in _LOWER_IS_BETTER or metric.endswith("loss")
    best = (min if lower else max)((r for r in scored if r.pruned_at is None), key=lambda r: _score(r, metric),
                                   default=None)
    ys = [_score(r, metric) for r in scored]
    margin = 0.06 * (max(ys) - min(ys)) or 0.05 * abs(ys[0]) or 0.05  # no point on the frame
    y_range = (min(ys) - margin, max(ys) + margin)

    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{_FONT}" font-size="10" fill="{_TEXT}">',
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<title>{escape(f"sweep: {y_label} vs swept values")}</title>',
        _text(width / 2, 18, f"Sweep of {len(results)} runs: {y_label} vs each swept value", size=12,
              anchor="middle", cls="title"),
        _text(width / 2, 34, _subtitle(results, scored, best, metric, lower), size=9, anchor="middle", fill="#555555"),
    ]
    for index, key in enumerate(keys):
        x0 = (index % cols) * _PANEL_W
        y0 = _HEADER + (index // cols) * _PANEL_H
        points = [_Point(r, _flatten(r.config).get(key), _score(r, metric), r.pruned_at is not None) for r in scored]
        out.append(_panel(index, key, points, x0, y0, y_range, y_label, metric))
    out.append(_legend(scored, pruned, listed, _HEADER + rows * _PANEL_H + 12))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _subtitle(results, scored, best, metric, lower) -> str:
    parts = []
    if best is not None:
        parts.append(f"best: {best.name} ({metric} {_score(best, metric):.4f}{', lower is better' if lower else ''})")
    missing = len(results) - len(scored)
    if missing:
        parts.append(f"{missing} run(s) without an eval {metric} not shown")
    return "; ".join(parts)


def _panel(index: int, key: str, points: list[_Point], x0: float, y0: float, y_range: tuple[float, float],
           y_label: str, metric: str) -> str:
    left, top = x0 + _LEFT, y0 + _TOP
    w, h = _PANEL_W - _LEFT - _RIGHT, _PANEL_H - _TOP - _BOTTOM
    values = [p.value for p in points]
    log = _is_log(values)
    y_lo, y_hi = y_range
    y_of = lambda v: top + h - (v - y_lo) / (y_hi - y_lo) * h  # noqa: E731
    scale = "log" if log else "category"
    out = [f'<g class="panel" id="panel-{index}" data-key={quoteattr(key)} data-scale="{scale}">',
           f'<rect x="{left:.2f}" y="{top:.2f}" width="{w:.2f}" height="{h:.2f}" fill="none" stroke="#444444" '
           f'stroke-width="0.8"/>']
    # y axis: grid lines, ticks and labels
    y_ticks = _nice_ticks(y_lo, y_hi)
    decimals = _decimals(y_ticks)
    for tick in y_ticks:
        y = y_of(tick)
        out.append(_line(left, y, left + w, y, _GRID, opacity=0.4))
        out.append(_line(left - 3.5, y, left, y, "#000000"))
        out.append(_text(left - 6, y + 3.5, f"{tick:.{decimals}f}", anchor="end", cls="ytick"))
    out.append(_text(x0 + 14, top + h / 2, y_label, anchor="middle", rotate=True, cls="ylabel"))
    # x axis
    if log:
        lo, hi = min(values), max(values)
        pad = 0.08 * math.log10(hi / lo)
        l_lo, l_hi = math.log10(lo) - pad, math.log10(hi) + pad
        x_of_value = lambda v: left + (math.log10(v) - l_lo) / (l_hi - l_lo) * w  # noqa: E731
        ticks = [(x_of_value(t), _num(t)) for t in _log_ticks(l_lo, l_hi)]
        slot = 14.0
    else:
        categories = _categories(values)
        slot = w / len(categories)
        centre = {c: left + (i + 0.5) * slot for i, c in enumerate(categories)}
        x_of_value = lambda v: centre[_key(v)]  # noqa: E731
        ticks = [(centre[c], _label(v)) for c, v in categories.items()]
    rotate = not log and (len(ticks) > 4 and max(len(t) for _, t in ticks) > 4 or max(len(t) for _, t in ticks) > 10)
    for x, label in ticks:
        out.append(_line(x, top, x, top + h, _GRID, opacity=0.4))
        out.append(_line(x, top + h, x, top + h + 3.5, "#000000"))
        if rotate:
            out.append(f'<text class="xtick" x="{x:.2f}" y="{top + h + 12:.2f}" text-anchor="end" '
                       f'transform="rotate(-30 {x:.2f} {top + h + 12:.2f})">{escape(_clip(label, 12))}</text>')
        else:
            out.append(_text(x, top + h + 14, label, anchor="middle", cls="xtick"))
    out.append(_text(left + w / 2, y0 + _PANEL_H - 8, key + (" (log scale)" if log else ""), anchor="middle",
                     cls="xlabel", size=10.5))
    # the mean of the trained-out runs at each value, then the points (runs sharing a value spread sideways)
    groups: dict[str, list[_Point]] = {}
    for p in points:
        groups.setdefault(_key(p.value), []).append(p)
    means = sorted((x_of_value(g[0].value), statistics.fmean(p.y for p in g if not p.pruned))
                   for g in groups.values() if any(not p.pruned for p in g))
    mean_style = f'fill="none" stroke="{_BLUE}" stroke-width="1.2" stroke-opacity="0.45"'
    if all(_is_number(v) for v in values):  # ordered values: a line through the means
        if len(means) > 1:
            line = " ".join(f"{x:.2f},{y_of(m):.2f}" for x, m in means)
            out.append(f'<polyline class="mean" points="{line}" {mean_style}/>')
    else:  # unordered categories: a dash at each mean
        for x, m in means:
            out.append(f'<path class="mean" d="M {x - 0.35 * slot:.2f} {y_of(m):.2f} H {x + 0.35 * slot:.2f}" '
                       f'{mean_style}/>')
    for group in groups.values():
        step = min(7.0, 0.7 * slot / max(len(group), 1))
        for k, p in enumerate(group):
            x = x_of_value(p.value) + (k - (len(group) - 1) / 2) * step
            out.append(_point(x, y_of(p.y), p, metric))
    out.append("</g>")
    return "\n".join(out)


def _point(x: float, y: float, p: _Point, metric: str) -> str:
    run = p.run
    tip = f"{run.name}: {metric} {p.y:.4f}"
    if p.pruned:
        tip += f" (pruned after epoch {run.pruned_at})"
        style = f'class="run pruned" fill="#ffffff" fill-opacity="0" stroke="{_GREY}" stroke-width="1.4"'
    else:
        style = f'class="run" fill="{_BLUE}" fill-opacity="0.85" stroke="{_BLUE}" stroke-width="0.8"'
    return (f'<circle cx="{x:.2f}" cy="{y:.2f}" r="4" {style} data-run={quoteattr(run.name)}>'
            f'<title>{escape(tip)}</title></circle>')


def _legend(scored: list[RunResult], pruned: list[RunResult], listed: list[RunResult], top: float) -> str:
    y = top + 10
    trained = len(scored) - len(pruned)
    out = ['<g class="legend">',
           f'<circle cx="20" cy="{y - 3.5:.2f}" r="4" fill="{_BLUE}" fill-opacity="0.85" stroke="{_BLUE}" '
           f'stroke-width="0.8"/>',
           _text(30, y, f"trained out ({trained})"),
           _line(130, y - 3.5, 152, y - 3.5, _BLUE, opacity=0.45, width=1.2),
           _text(158, y, "mean of the trained-out runs at each value")]
    if pruned:
        out += [f'<circle cx="390" cy="{y - 3.5:.2f}" r="4" fill="#ffffff" fill-opacity="0" stroke="{_GREY}" '
                f'stroke-width="1.4"/>', _text(400, y, f"pruned ({len(pruned)})")]
        y += _LEGEND_ROW
        out.append(_text(20, y, "pruned runs:", fill=_GREY))
        for run in listed:
            y += _LEGEND_ROW
            out.append(_text(30, y, _pruned_label(run), fill=_GREY, cls="pruned-run"))
        if len(pruned) > len(listed):
            y += _LEGEND_ROW
            out.append(_text(30, y, f"… and {len(pruned) - len(listed)} more", fill=_GREY))
    out.append("</g>")
    return "\n".join(out)


def _pruned_label(run: RunResult) -> str:
    return f"{run.name} (after epoch {run.pruned_at})"


# ----------------------------------------------------------------------------- scales and labels
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_log(values: list[Any]) -> bool:
    return (all(_is_number(v) and v > 0 for v in values) and max(values) / min(values) > LOG_SPAN)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _categories(values: list[Any]) -> dict[str, Any]:
    """Each distinct value (by its JSON), numbers in increasing order, anything else in order of appearance."""
    distinct = {_key(v): v for v in values}
    if all(_is_number(v) for v in distinct.values()):
        return dict(sorted(distinct.items(), key=lambda item: item[1]))
    return distinct


def _label(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, (list, tuple)):
        return "+".join(_label(v) for v in value)
    return str(value)


def _num(value: float) -> str:
    return f"{value:g}"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """About ``target`` round ticks (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    raw = (hi - lo) / (target - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _decimals(ticks: list[float]) -> int:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    return max(0, -math.floor(math.log10(step) + 1e-9))


def _log_ticks(l_lo: float, l_hi: float) -> list[float]:
    """Powers of ten inside [10**l_lo, 10**l_hi]; with 2 and 5 times them too where fewer than two powers fit."""
    decades = list(range(math.ceil(l_lo), math.floor(l_hi) + 1))
    mantissas = (1,) if len(decades) >= 2 else (1, 2, 5)
    ticks = [m * 10.0 ** d for d in range(math.floor(l_lo), math.ceil(l_hi) + 1) for m in mantissas]
    return [t for t in ticks if l_lo <= math.log10(t) <= l_hi]


# ----------------------------------------------------------------------------- SVG elements
def _text(x: float, y: float, text: str, *, anchor: str = "start", size: float | None = None, fill: str | None = None,
          rotate: bool = False, cls: str | None = None) -> str:
    attrs = [f'x="{x:.2f}"', f'y="{y:.2f}"']
    if anchor != "start":
        attrs.append(f'text-anchor="{anchor}"')
    if size:
        attrs.append(f'font-size="{size}"')
    if fill:
        attrs.append(f'fill="{fill}"')
    if rotate:
        attrs.append(f'transform="rotate(-90 {x:.2f} {y:.2f})"')
    if cls:
        attrs.append(f'class="{cls}"')
    return f'<text {" ".join(attrs)}>{escape(text)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, *, opacity: float = 1.0, width: float = 0.8) -> str:
    return (f'<line x1="{x1:.2f}" y1="{y1:.2f}" x2="{x2:.2f}" y2="{y2:.2f}" stroke="{stroke}" '
            f'stroke-width="{width}" stroke-opacity="{opacity}"/>')
