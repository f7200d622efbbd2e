"""Benchmark forward+backward time of every normlab norm at ResNet-like shapes.

For each device (CPU, and CUDA when available) and each activation shape (N, C, H, W), every
registered norm is built with ``build_norm(name, C)`` and timed as ``y = layer(x); y.backward(grad)``
in train mode, with ``x`` requiring grad and a fixed random ``grad``. A row gives the median
milliseconds per iteration, after a warm-up, and the ratio to ``torch.nn.BatchNorm2d`` on the
same shape and device. Candidates compared with each other are timed interleaved (one iteration
of each per round, in shuffled order), so that drift on the machine hits them alike; each group
is timed for at least ``--repeats`` rounds, then for as many more as fit in ``--seconds`` (up
to 100).

Extra rows, on the first shape's C, H, W with a batch of W·N = 128 images, check these targets:

- per-worker ``bn`` at W=64, N=2 is at least 3× faster than the reference it replaces, plain BN
  on each of the W chunks in a Python loop (``torch.cat([F.batch_norm(chunk, ...) ...])``);
- ``bn`` at W=1 is within 1.3× of ``nn.BatchNorm2d``;
- ``bn`` at W=8, N=16 (the paper's 8-worker protocol) is reported against ``nn.BatchNorm2d``;
- ``gn``, ``ln`` and ``in`` are within 1.2× of ``nn.GroupNorm`` with the same number of groups.

A missed target is reported as MISS; the script still exits 0. The default run takes about
25 s on 2 CPU cores (3 groups × ``--seconds``, plus warm-up), more where a GPU adds its groups.

    python scripts/bench_norms.py
    python scripts/bench_norms.py --shapes 64x128x28x28 --norms bn gn --device cpu --repeats 9 --csv out.csv
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from anywhere, normlab not installed
from normlab.norms import NORMS, REGISTRY, NormChannelError, build_norm  # noqa: E402

DEFAULT_SHAPES = ("128x64x32x32", "32x256x14x14")
LAYOUT_SHAPE = "128x16x32x32"
TARGET_BATCH = 128  # W·N for the per-worker rows
BN_LABEL = "nn.BatchNorm2d"
MAX_REPEATS = 100

Shape = tuple[int, int, int, int]


@dataclass(frozen=True)
class Row:
    device: str
    shape: Shape
    norm: str
    ms: float
    vs_bn: float  # ms / ms of the group's reference (nn.BatchNorm2d, or the faster of its two layouts)
    n: int  # timed iterations behind the median
    precision: str = "fp32"  # of the activations; parameters stay float32, as under autocast


@dataclass(frozen=True)
class Budget:
    """How long each group of interleaved candidates is timed (see time_interleaved)."""

    warmup: int
    repeats: int
    seconds: float


@dataclass(frozen=True)
class Target:
    """`norm` measured against `reference` (rows of one device); ratio = ms / reference ms,
    or its inverse (a speedup) when `speedup` is set. `limit` None: reported, no target."""

    description: str
    norm: str
    reference: str
    limit: float | None
    speedup: bool = False

    def evaluate(self, rows: dict[str, Row]) -> tuple[str, str]:
        """(measured ratio, verdict) as text."""
        if self.norm not in rows or self.reference not in rows:
            return "-", "skipped"
        ratio = rows[self.norm].ms / rows[self.reference].ms
        if self.speedup:
            ratio = 1 / ratio
        if self.limit is None:
            return f"{ratio:.2f}x", "info"
        met = ratio >= self.limit if self.speedup else ratio <= self.limit
        return f"{ratio:.2f}x", "PASS" if met else "MISS"


class ChunkLoopBatchNorm2d(nn.Module):
    """The reference per-worker BN: plain BN on each of the `workers` chunks of the batch, in a Python loop."""

    def __init__(self, num_features: int, workers: int) -> None:
        super().__init__()
        self.workers = workers
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            F.batch_norm(chunk, self.running_mean, self.running_var, self.weight, self.bias, training=True)
            for chunk in x.chunk(self.workers)
        ])


# ---------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd_seconds(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds for one ``y = layer(x); y.backward(grad)``, gradients cleared beforehand (untimed)."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    synchronize(x.device)
    start = time.perf_counter()
    layer(x).backward(grad)
    synchronize(x.device)
    return time.perf_counter() - start


def time_interleaved(layers: Sequence[nn.Module], shape: Shape, device: torch.device, budget: Budget,
                     dtype: torch.dtype = torch.float32,
                     formats: Sequence[torch.memory_format] | None = None) -> tuple[list[float], int]:
    """Median ms per forward+backward of each layer on one input, and the number of timed rounds.

    The input is random, of `dtype` (bf16 activations meet float32 parameters, as under autocast), in
    each layer's memory format (`formats`, default contiguous). After `budget.warmup` untimed
    iterations of each layer, every round times one iteration of each layer in turn, in a fresh random
    order (so that no layer always follows the same one, e.g. a slow loop that lets the GPU idle): at
    least `budget.repeats` rounds, then more while the rounds have taken less than `budget.seconds` in
    all, up to MAX_REPEATS.
    """
    formats = list(formats or [torch.contiguous_format] * len(layers))
    x = torch.randn(shape, device=device).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    inputs = {f: (x.contiguous(memory_format=f).requires_grad_(), grad.contiguous(memory_format=f))
              for f in set(formats)}
    layers = [layer.to(device).train() for layer in layers]
    for layer, f in zip(layers, formats):
        for _ in range(budget.warmup):
            fwd_bwd_seconds(layer, *inputs[f])
    seconds: list[list[float]] = [[] for _ in layers]
    order = list(range(len(layers)))
    rng = random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < budget.repeats or (rounds < MAX_REPEATS and time.perf_counter() - start < budget.seconds):
        rng.shuffle(order)
        for i in order:
            seconds[i].append(fwd_bwd_seconds(layers[i], *inputs[formats[i]]))
        rounds += 1
    return [1e3 * statistics.median(times) for times in seconds], rounds


def bench_group(candidates: dict[str, nn.Module], shape: Shape, device: torch.device, budget: Budget,
                dtype: torch.dtype = torch.float32, formats: dict[str, torch.memory_format] | None = None,
                reference: str = BN_LABEL) -> list[Row]:
    """Rows for `candidates` (label → layer) timed together; the ratio is to the `reference` candidate."""
    formats = formats or {}
    medians, rounds = time_interleaved(list(candidates.values()), shape, device, budget, dtype,
                                       [formats.get(label, torch.contiguous_format) for label in candidates])
    ms = dict(zip(candidates, medians))
    return [Row(str(device), shape, label, t, t / ms[reference], rounds) for label, t in ms.items()]


# ------------------------------------------------------------------------------------ candidates


def describe(name: str, layer: nn.Module) -> str:
    """The norm's name with its options that matter for speed: workers W and groups G."""
    options = []
    if REGISTRY[name].batch_dependent:
        options.append(f"W={layer.workers}")
    groups = getattr(layer, "num_groups", getattr(layer, "groups", None))
    if groups is not None:
        options.append(f"G={groups}")
    return f"{name} ({', '.join(options)})" if options else name


def registry_candidates(names: Sequence[str], channels: int) -> tuple[dict[str, nn.Module], list[str]]:
    """nn.BatchNorm2d and every norm in `names` built for `channels`; notes for those that cannot be."""
    candidates: dict[str, nn.Module] = {BN_LABEL: nn.BatchNorm2d(channels)}
    notes = []
    for name in names:
        try:
            layer = build_norm(name, channels)
        except NormChannelError as e:
            notes.append(f"skipped {e}")
            continue
        candidates[describe(name, layer)] = layer
    return candidates, notes


def target_candidates(channels: int) -> tuple[dict[str, nn.Module], list[Target]]:
    """The layers for the target rows, and the targets over them."""
    candidates: dict[str, nn.Module] = {BN_LABEL: nn.BatchNorm2d(channels)}
    targets = []

    def add(label: str, layer: nn.Module) -> str:
        candidates[label] = layer
        return label

    def per_worker(label: str, workers: int, layer: nn.Module) -> str:
        return add(f"{label} (W={workers}, N={TARGET_BATCH // workers})", layer)

    bn_w1 = per_worker("bn", 1, build_norm("bn", channels, workers=1))
    bn_w8 = per_worker("bn", 8, build_norm("bn", channels, workers=8))
    bn_w64 = per_worker("bn", 64, build_norm("bn", channels, workers=64))
    loop_w64 = per_worker("loop-over-chunks bn", 64, ChunkLoopBatchNorm2d(channels, workers=64))
    targets += [
        Target("bn W=64: speedup over loop-over-chunks", bn_w64, loop_w64, 3.0, speedup=True),
        Target("bn W=1 / nn.BatchNorm2d", bn_w1, BN_LABEL, 1.3),
        Target("bn W=8 / nn.BatchNorm2d", bn_w8, BN_LABEL, None),
    ]
    for name in ("gn", "ln", "in"):
        try:
            layer = build_norm(name, channels)
        except NormChannelError:  # C not divisible by G: no rows, the target shows as skipped
            targets.append(Target(f"{name} / nn.GroupNorm", name, "nn.GroupNorm", 1.2))
            continue
        norm = add(describe(name, layer), layer)
        reference = add(f"nn.GroupNorm (G={layer.num_groups})", nn.GroupNorm(layer.num_groups, channels))
        targets.append(Target(f"{name} / nn.GroupNorm", norm, reference, 1.2))
    return candidates, targets


FASTEST_BN = "fastest nn.BatchNorm2d"
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def layout_candidates(channels: int, precision: str) -> tuple[dict[str, nn.Module], dict[str, torch.memory_format],
                                                              list[Target]]:
    """Per-worker BN at W=8 and W=64 in each memory format against torch's BN in its faster format.

    The target (<= 1.15x) is the same in both formats, so that the format a whole training step wants
    (the convolutions') costs BN nothing.
    """
    candidates: dict[str, nn.Module] = {}
    formats: dict[str, torch.memory_format] = {}
    targets = []
    for layout, memory_format in LAYOUTS.items():
        label = f"{BN_LABEL} {layout}"
        candidates[label], formats[label] = nn.BatchNorm2d(channels), memory_format
    for layout, memory_format in LAYOUTS.items():
        for workers in (8, 64):
            label = f"bn (W={workers}, N={TARGET_BATCH // workers}) {layout}"
            candidates[label], formats[label] = build_norm("bn", channels, workers=workers), memory_format
            targets.append(Target(f"{precision} {label} / {FASTEST_BN}", label, FASTEST_BN, 1.15))
    return candidates, formats, targets


def with_fastest_bn(rows: list[Row]) -> list[Row]:
    """`rows` of a layout group, the faster nn.BatchNorm2d added as the reference and every ratio made to it."""
    fastest = min((r for r in rows if r.norm.startswith(BN_LABEL)), key=lambda r: r.ms)
    rows = [Row(fastest.device, fastest.shape, FASTEST_BN, fastest.ms, 1.0, fastest.n, fastest.precision), *rows]
    return [Row(r.device, r.shape, r.norm, r.ms, r.ms / fastest.ms, r.n, r.precision) for r in rows]


# ------------------------------------------------------------------------------------- reporting


def format_shape(shape: Shape) -> str:
    return "x".join(map(str, shape))


def print_table(rows: Sequence[Row]) -> None:
    """Rows in aligned columns, a blank line between devices/shapes."""
    header = ("device", "precision", "shape", "norm", "ms", "vs BN", "n")
    cells = [(r.device, r.precision, format_shape(r.shape), r.norm, f"{r.ms:.2f}", f"{r.vs_bn:.2f}x", str(r.n))
             for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    aligns = ("<", "<", "<", "<", ">", ">", ">")

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    previous = None
    for row, cell in zip(rows, cells):
        if previous is not None and (row.device, row.precision, row.shape) != previous:
            print()
        previous = (row.device, row.precision, row.shape)
        print(line(cell))


def print_targets(results: Sequence[tuple[str, Target, str, str]]) -> None:
    print("\ntargets")
    width = max(len(t.description) for _, t, _, _ in results)
    for device, target, ratio, verdict in results:
        goal = "-" if target.limit is None else f"{'>=' if target.speedup else '<='} {target.limit:g}x"
        print(f"  {device:<5}  {target.description:<{width}}  {ratio:>7}  (target {goal:>7})  {verdict}")


def write_csv(path: str, rows: Sequence[Row]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["device", "precision", "shape", "norm", "ms", "vs_bn", "n"])
        for r in rows:
            writer.writerow([r.device, r.precision, format_shape(r.shape), r.norm, f"{r.ms:.4f}", f"{r.vs_bn:.4f}",
                             r.n])


# ------------------------------------------------------------------------------------------ main


def parse_shape(text: str) -> Shape:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not NxCxHxW, e.g. 128x64x32x32")
    return shape


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        metavar="NxCxHxW", help=f"input shapes (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS), metavar="NAME",
                        help=f"registry names (default: all of {', '.join(NORMS)})")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="all: CPU, and CUDA when available (default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed iterations per layer, at least (default: 3)")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help=f"keep timing each group of layers for this long, up to {MAX_REPEATS} "
                             "iterations per layer (default: 6; 0: exactly --repeats)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per layer first (default: 1)")
    parser.add_argument("--layout-shape", type=parse_shape, default=parse_shape(LAYOUT_SHAPE), metavar="NxCxHxW",
                        help=f"shape of the per-worker BN rows in both memory formats (default: {LAYOUT_SHAPE}, "
                             "resnet20's first stage at a total batch of 128)")
    parser.add_argument("--precisions", nargs="+", choices=tuple(PRECISIONS), default=list(PRECISIONS),
                        help="activation precisions of those rows (default: fp32 bf16)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.repeats < 1 or args.warmup < 0 or args.seconds < 0:
        parser.error("--repeats must be >= 1, --warmup and --seconds >= 0")
    return args


def devices(choice: str) -> list[torch.device]:
    names = {"cpu": ["cpu"], "cuda": ["cuda"], "all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}
    return [torch.device(name) for name in names[choice]]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    budget = Budget(args.warmup, args.repeats, args.seconds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; forward+backward in train mode, "
          f"ms = median of n iterations after {args.warmup} warm-up, layers of a group interleaved\n")

    rows: list[Row] = []
    notes: list[str] = []
    target_results = []
    _, channels, height, width = args.shapes[0]
    target_shape = (TARGET_BATCH, channels, height, width)
    for device in devices(args.device):
        for shape in args.shapes:
            candidates, skipped = registry_candidates(args.norms, shape[1])
            notes += [f"{device} {format_shape(shape)}: {note}" for note in skipped]
            rows += bench_group(candidates, shape, device, budget)
        candidates, targets = target_candidates(channels)
        target_rows = bench_group(candidates, target_shape, device, budget)
        rows += target_rows
        by_label = {r.norm: r for r in target_rows}
        target_results += [(str(device), t, *t.evaluate(by_label)) for t in targets]
        for precision in args.precisions:
            candidates, formats, targets = layout_candidates(args.layout_shape[1], precision)
            layout_rows = with_fastest_bn(bench_group(candidates, args.layout_shape, device, budget,
                                                      PRECISIONS[precision], formats, reference=f"{BN_LABEL} nchw"))
            rows += [Row(r.device, r.shape, r.norm, r.ms, r.vs_bn, r.n, precision) for r in layout_rows]
            by_label = {r.norm: r for r in layout_rows}
            target_results += [(str(device), t, *t.evaluate(by_label)) for t in targets]

    print_table(rows)
    for note in notes:
        print(f"note: {note}")
    print_targets(target_results)
    if args.csv:
        write_csv(args.csv, rows)
        print(f"\nwrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
