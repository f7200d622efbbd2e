"""One table of what the report shows: metric names, labels and formats; norm names and colors.

Every figure and table reads its labels here, so the same thing is named and colored the same way
everywhere (pycls's ``metrics_info`` is the model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    fmt: str = "{:.1f}"


METRICS = {m.name: m for m in (
    Metric("val_error_median5", "top-1 error (%), median of last 5 evaluations"),
    Metric("val_error", "final top-1 val error (%)"),
    Metric("best_val_error", "best top-1 val error (%)"),
    Metric("train_error", "train error (%)"),
    Metric("val_error_top5", "top-5 val error (%)"),
    *(Metric(f"val_error_{mode}_median5", f"top-1 error (%) with {what} BN statistics, median of last 5 evaluations")
      for mode, what in (("ema", "EMA"), ("precise", "precise"), ("batch", "batch"))),
    *(Metric(f"val_error_{mode}", f"final top-1 val error (%) with {what} BN statistics")
      for mode, what in (("ema", "EMA"), ("precise", "precise"), ("batch", "batch"))),
    Metric("per_worker_batch", "images per worker (N)", "{:.0f}"),
    Metric("groups", "groups (G)", "{:.0f}"),
    Metric("group_size", "channels per group", "{:.0f}"),
    Metric("epoch", "epoch", "{:.0f}"),
    Metric("wall_time_s", "wall time (s)", "{:.0f}"),
)}

RUN_METRICS = ("val_error_median5", "val_error", "best_val_error",  # per-run errors the tables can show
               *(f"val_error_{mode}{suffix}" for mode in ("ema", "precise", "batch") for suffix in ("_median5", "")))

# One colour and one marker per norm everywhere, from Okabe & Ito's colour-blind-safe palette (BN blue, GN
# vermilion, as close to the paper's as the palette allows), every colour with contrast on white; the markers tell
# the norms apart where colours alone would not.
NORM_LABELS = {"bn": "BN", "syncbn": "SyncBN", "gn": "GN", "ln": "LN", "in": "IN", "none": "no norm", "brn": "BRN", "frn": "FRN",
               "evonorm_b0": "EvoNorm-B0", "evonorm_s0": "EvoNorm-S0", "gn_ws": "GN+WS"}
NORM_COLORS = {"bn": "#0072B2", "syncbn": "#004488", "gn": "#D55E00", "ln": "#009E73", "in": "#CC79A7", "none": "#555555",
               "brn": "#332288", "frn": "#8F6A00", "evonorm_b0": "#000000", "evonorm_s0": "#882255",
               "gn_ws": "#999933"}
NORM_MARKERS = {"bn": "o", "syncbn": "p", "gn": "s", "ln": "^", "in": "D", "none": "x", "brn": "v", "frn": "P",
                "evonorm_b0": "X", "evonorm_s0": "*", "gn_ws": "h"}
NORM_ORDER = list(NORM_LABELS)


MINUS = "−"  # the typographic minus: labels ("GN − BN") and numbers use the same sign


def with_sign(value: float) -> str:
    """A difference with its sign and one decimal: "+1.2", "−0.6" (a minus sign, not a hyphen); one that rounds
    to zero is "0.0", without a sign it does not have at that precision."""
    text = f"{value:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text.replace("-", MINUS)


def norm_label(norm: str) -> str:
    return NORM_LABELS.get(norm, norm)


def norm_color(norm: str) -> str:
    return NORM_COLORS.get(norm, "#333333")


def norm_marker(norm: str) -> str:
    return NORM_MARKERS.get(norm, "o")


def norm_sort_key(norm: str) -> int:
    return NORM_ORDER.index(norm) if norm in NORM_ORDER else len(NORM_ORDER)


PROTOCOL_LABELS = {"paper": "paper protocol: W fixed, total batch and lr scale with N",
                   "fixed_total": "fixed total batch: W = B/N, the same steps and lr for every N"}


def protocol_label(protocol: str) -> str:
    return PROTOCOL_LABELS.get(protocol, protocol)
