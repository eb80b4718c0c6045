"""What every chart shares: one colour per compressor, figure size, saving without pyplot.

Figures are `matplotlib.figure.Figure` objects saved through the Agg canvas: no pyplot,
no global state, no display needed.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

DPI = 100
# One colour per compressor name, the same in every figure (and across invocations).
# Paired names share a hue: dark = with error feedback, light = without.
COLORS = {
    "none": "#000000",
    "topk": "#1f77b4", "topk2": "#aec7e8",
    "gaussian": "#ff7f0e", "gaussian2": "#ffbb78",
    "randomkec": "#2ca02c", "randomk": "#98df8a",
    "redsync": "#d62728", "redsynctrim": "#ff9896",
    "dgcsampling": "#9467bd",
    "hggtopk": "#e377c2",
    "lax.top_k": "#7f7f7f",  # the selection benchmark's reference
}
_SPARE = ("#bcbd22", "#17becf", "#8c564b", "#c5b0d5", "#dbdb8d", "#9edae5", "#c49c94")
# Densities are told apart by line style (colour is the compressor's).
LINESTYLES = ("-", "--", ":", "-.")


def colors_for(names) -> dict[str, str]:
  """Fixed colours for known names; unknown names get spare colours in sorted order."""
  names = sorted(set(names))
  out, spare = {}, iter(_SPARE * (1 + len(names) // len(_SPARE)))
  for name in names:
    out[name] = COLORS[name] if name in COLORS else next(spare)
  return out


def figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save(fig: Figure, out_dir: str, name: str) -> str:
  """Writes `<out_dir>/<name>` at the figure's own size (no tight bbox: sizes stay fixed)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  fig.canvas.draw()
  rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
  # A 256-colour palette keeps these flat-colour charts sharp at about a third of the size
  # of full-colour PNGs (they are committed under docs/img).
  Image.fromarray(rgb).quantize(256).save(path, optimize=True)
  return path
