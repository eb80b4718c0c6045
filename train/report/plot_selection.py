"""Chart of a `python -m benchmarks.selection` JSON: selection time vs n, log-log.

The JSON holds `machine`, `args` and `rows` of {n, density, distribution, method, ms, ...};
the reference rows (`lax.top_k`) of newer files also carry `floor_ms`, one fused
`jnp.abs(x).max()` pass: the floor for any selection that reads x once. Per method and n
the line is the median over the distributions, the band their min..max.
"""

from __future__ import annotations

import json
import os
import statistics

from matplotlib.lines import Line2D

from train.report import style
from train.errors import UsageError

_ROW_KEYS = ("n", "density", "method", "ms")
REFERENCE = "lax.top_k"


def load(path: str) -> dict:
  if not os.path.isfile(path):
    raise UsageError(f"selection benchmark file {path} does not exist; write one with "
                     "python -m benchmarks.selection --out FILE")
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as err:
    raise UsageError(f"{path} is not valid JSON ({err})") from None
  rows = data.get("rows") if isinstance(data, dict) else None
  if not rows or not all(isinstance(r, dict) and all(k in r for k in _ROW_KEYS) for r in rows):
    raise UsageError(f"{path} is not a benchmarks.selection result: it needs 'rows' with "
                     f"{', '.join(_ROW_KEYS)}")
  return data


def _by(rows, key_fn):
  out: dict = {}
  for r in rows:
    out.setdefault(key_fn(r), []).append(r)
  return out


def plot(path: str, out_dir: str) -> str:
  """Writes `<out_dir>/<basename of path>.png`; returns its path."""
  data = load(path)
  rows, machine = data["rows"], data.get("machine", {})
  densities = sorted({r["density"] for r in rows})
  colors = style.colors_for(r["method"] for r in rows)
  fig = style.figure(5.5 * len(densities) + 1.8, 4.8)
  axes = fig.subplots(1, len(densities), squeeze=False, sharey=True)[0]
  has_floor = False
  for ax, density in zip(axes, densities):
    sub = [r for r in rows if r["density"] == density]
    methods = sorted(_by(sub, lambda r: r["method"]).items(),
                     key=lambda kv: (kv[0] != REFERENCE, kv[0]))
    for method, group in methods:
      per_n = sorted(_by(group, lambda r: r["n"]).items())
      ns = [n for n, _ in per_n]
      ms = [[r["ms"] for r in g] for _, g in per_n]
      ref = method == REFERENCE
      ax.plot(ns, [statistics.median(m) for m in ms], color=colors[method], marker="o", ms=3,
              lw=2.5 if ref else 1.3)
      ax.fill_between(ns, [min(m) for m in ms], [max(m) for m in ms], color=colors[method],
                      alpha=0.15, lw=0)
    floors = sorted(_by([r for r in sub if r.get("floor_ms") is not None],
                        lambda r: r["n"]).items())
    if floors:
      has_floor = True
      ax.plot([n for n, _ in floors], [statistics.median(r["floor_ms"] for r in g)
                                       for _, g in floors], color="k", ls="--", lw=1.2)
    else:
      ax.text(0.03, 0.97, "one-pass floor not recorded in this file", transform=ax.transAxes,
              va="top", fontsize=8, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="n (elements)", title=f"density {density:g}")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("selection time (ms, median over distributions; band: min..max)")
  axes[0].yaxis.label.set_fontsize(8)
  dev = machine.get("device", machine.get("platform", "?"))
  fig.suptitle(f"Selection time vs n: {os.path.basename(path)} ({dev}, jax "
               f"{machine.get('jax', '?')}, {machine.get('cores', '?')} host cores)",
               fontsize=10)
  handles = [Line2D([], [], color=colors[m], lw=2.5 if m == REFERENCE else 1.3, marker="o",
                    ms=3, label=m) for m in sorted(colors, key=lambda m: (m != REFERENCE, m))]
  if has_floor:
    handles.append(Line2D([], [], color="k", ls="--", label="one pass: |x|.max()"))
  fig.legend(handles=handles, loc="outside right upper", fontsize=8)
  name = os.path.splitext(os.path.basename(path))[0] + ".png"
  return style.save(fig, out_dir, name)
