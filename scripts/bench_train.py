"""Training throughput: normlab's training step beside the standard PyTorch CIFAR loop, same model and data shape.

For each cell of model × norm × per-worker batch N × workers W, two loops run in this process, alternating:

- normlab: uint8 images on the device, crop and flip drawn per sample and applied in batch, per-worker
  norms (W groups of N), the precision and memory format normlab picks for the device and norm, no
  host-device sync per step, and on CUDA the whole step replayed as one CUDA graph (as in training);
- reference: the loop of pytorch/examples and most CIFAR repos: a Dataset of PIL images with
  RandomCrop(32, 4), RandomHorizontalFlip, ToTensor and Normalize, a DataLoader (num_workers = cores,
  pin_memory on CUDA), fp32, eager, nn.BatchNorm2d / nn.GroupNorm, a literal batch of N·W, loss.item()
  every step.

Throughput is images/s over timed steps after warm-up, with the device synchronized. Peak memory (CUDA
only: a CPU process has no per-loop allocator statistics) is each loop's own: the peak above what was
allocated before the loop was built. The real CIFAR-10
JPEG zip is used when it is found (NORMLAB_CIFAR10_JPEG or ../shared/data/cifar10-jpeg.zip), synthetic
images of the same shape otherwise.

    python scripts/bench_train.py                         # the default grid, < 3 minutes on 2 CPU cores
    python scripts/bench_train.py --norms bn gn --per-worker 32 2 --workers 8 --steps 40 --csv out.csv
    python scripts/bench_train.py --cuda-graph false --skip-reference    # ablations: eager, --compile, --channels-last
    python scripts/bench_train.py --compile-vs-eager --threads 2         # trainer.compile's gain, bn and gn at 16×8, 2×8

--compile-vs-eager times normlab's step eager and compiled (torch.compile as trainer.compile does it), alternating
rounds in one process, in each memory format (or the one --channels-last names), and prints the ratio; on a CPU both
run per-worker BN and GN on normlab's kernel (its status heads the table).
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from normlab.config import OptimConfig  # noqa: E402
from normlab.data.device_loader import DeviceLoader, Normalize  # noqa: E402
from normlab.engine.loop import train_epoch  # noqa: E402
from normlab.engine.optim import Schedule, build_optimizer  # noqa: E402
from normlab.engine.step import CudaGraphStep, TrainStep, compile_model  # noqa: E402
from normlab.engine.memory_format import FORMATS, choose_memory_format  # noqa: E402
from normlab.engine.runtime import resolve_precision  # noqa: E402
from normlab.models import build_model  # noqa: E402
from normlab.norms import PerWorkerBatchNorm2d, cpu_kernel  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
ZIP_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.zip"


def load_images(limit: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, 32, 32, 3) uint8 images and labels: CIFAR-10 from the JPEG zip if present, else synthetic."""
    path = Path(os.environ.get("NORMLAB_CIFAR10_JPEG", ZIP_DEFAULT))
    if path.exists():
        from omegaconf import OmegaConf

        from normlab.config import DataConfig
        from normlab.data.imagefolder import ImageFolderSource

        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "imagefolder", "root": str(path)})
        data = ImageFolderSource().load(cfg)
        images = data.train_images[:limit].permute(0, 2, 3, 1).numpy()
        return np.ascontiguousarray(images), data.train_labels[:limit].numpy(), "cifar10-jpeg"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (limit, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, limit), "synthetic"


class PILImages(torch.utils.data.Dataset):
    """torchvision's CIFAR10 dataset as it is: uint8 HWC arrays, one PIL image per sample."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def plain_norms(module: nn.Module) -> nn.Module:
    """The reference model's norms are torch's own classes: per-worker BN at W=1 becomes nn.BatchNorm2d."""
    for name, child in module.named_children():
        if isinstance(child, PerWorkerBatchNorm2d):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            plain_norms(child)
    return module


HE_CIFAR_RESNETS = [f"resnet{depth}" for depth in (8, 20, 32, 44, 56, 110)]


def norm_node(norm: str, model: str) -> dict:
    node = {"name": norm}
    if norm in ("gn", "gn_ws", "evonorm_s0") and model in HE_CIFAR_RESNETS:
        node["groups"] = 8  # the He CIFAR nets have 16 channels in their first stage
    return node


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class NormlabLoop:
    def __init__(self, model_name, norm, per_worker, workers, images, labels, device, *, channels_last=False,
                 cuda_graph=False, compile=False):
        self.device = device
        self.precision = resolve_precision("auto", device)
        self.channels_last = channels_last
        self.cuda_graph, self.compile = cuda_graph, compile
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
        normalize = Normalize(torch.tensor(MEAN), torch.tensor(STD), device, self.channels_last)
        self.loader = DeviceLoader(x, torch.from_numpy(labels).long().to(device), per_worker * workers, normalize,
                                   train=True, padding=4)
        self.model = build_model(model_name, 10, norm_node(norm, model_name), workers=workers).to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, OptimConfig(), 0.01, capturable=cuda_graph)
        self.schedule = Schedule(self.optimizer, lambda step: 1.0)
        forward = compile_model(self.model, None if compile is True else compile) if compile else self.model
        self.step = TrainStep(forward, self.optimizer, device=device, precision=self.precision,
                              autocast_cache=not cuda_graph)
        if cuda_graph:
            self.step = CudaGraphStep(self.step)
        self.epoch = itertools.count(1)

    def batches(self, steps: int):
        while steps > 0:
            for batch in itertools.islice(self.loader.epoch(next(self.epoch)), steps):
                steps -= 1
                yield batch

    def run(self, steps: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        train_epoch(self.step, self.batches(steps), self.schedule, steps=steps)
        sync(self.device)
        return time.perf_counter() - start

    @property
    def setting(self) -> str:
        compiled = f"compiled:{self.compile}" if isinstance(self.compile, str) else "compiled"
        flags = [("channels_last", self.channels_last), ("graph", self.cuda_graph), (compiled, self.compile)]
        return " ".join([self.precision] + [name for name, on in flags if on])


class ReferenceLoop:
    def __init__(self, model_name, norm, batch, images, labels, device, loader_workers):
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            PILImages(images, labels), batch_size=batch, shuffle=True, drop_last=True, num_workers=loader_workers,
            pin_memory=device.type == "cuda", persistent_workers=loader_workers > 0)
        self.model = plain_norms(build_model(model_name, 10, norm_node(norm, model_name), workers=1)).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.iterator = iter(self.loader)

    def next_batch(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def run(self, steps: int) -> float:
        self.model.train()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            images, labels = self.next_batch()
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            loss = F.cross_entropy(self.model(images), labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            loss.item()
        sync(self.device)
        return time.perf_counter() - start


def probed_format(loop: Callable[..., NormlabLoop], batch: int, device: torch.device) -> bool:
    """What training's probe (trainer.channels_last=auto) picks for this cell: channels_last or not."""
    with tempfile.TemporaryDirectory() as cache:  # always a fresh probe, never an earlier session's cache
        return choose_memory_format("auto", lambda fmt: loop(channels_last=fmt).step, device=device,
                                    shape=(batch, 3, 32, 32), classes=10, key="bench", job_steps=10**9,
                                    cache_dir=Path(cache)).channels_last


PRESETS = {
    "study": {"help": "the CPU-scale studies' jobs: resnet8 (width 16), total batch 32 at W=1 and W=16, bn and gn8, "
                      "one thread (two such jobs share 2 cores)",
              "cells": [(32, 1), (2, 16)], "args": {"models": ["resnet8"], "norms": ["bn", "gn"], "threads": 1}},
}


def memory_mark(device: torch.device) -> int | None:
    """CUDA memory held now, and a fresh peak: what a loop built after this adds is its own."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(mark: int | None, device: torch.device) -> float | None:
    """Peak MB above `mark`: the data, model, optimizer, graph pool and activations of the loop built since."""
    return None if mark is None else (torch.cuda.max_memory_allocated(device) - mark) / 2**20


def measure(loop, steps: int, warmup: int) -> float:
    loop.run(warmup)
    return loop.run(steps)


def compile_vs_eager(args, device: torch.device, images: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Each cell's step eager and compiled, in the same process, memory format and precision; rows with the ratio."""
    formats = list(FORMATS) if args.channels_last == "auto" else [args.channels_last == "true"]
    if device.type == "cpu":
        print(f"per-worker BN and GN run on: {cpu_kernel.status()}\n")
    print(f"{'model':10s} {'norm':5s} {'N':>3s} {'W':>3s} {'format':13s} {'eager img/s':>11s} {'compiled img/s':>14s} "
          f"{'compiled/eager':>14s}  setting")
    rows = []
    for model, norm, n, w, channels_last in itertools.product(args.models, args.norms, args.per_worker, args.workers,
                                                             formats):
        loops = {mode: NormlabLoop(model, norm, n, w, images, labels, device, channels_last=channels_last,
                                   compile=(args.compile or True) if mode == "compiled" else False)
                 for mode in ("eager", "compiled")}
        seconds = {mode: measure(loop, args.steps, args.warmup) for mode, loop in loops.items()}
        for _ in range(args.rounds - 1):  # alternate, keep the best of each
            seconds = {mode: min(t, loops[mode].run(args.steps)) for mode, t in seconds.items()}
        ips = {mode: args.steps * n * w / t for mode, t in seconds.items()}
        layout = FORMATS[channels_last]
        print(f"{model:10s} {norm:5s} {n:3d} {w:3d} {layout:13s} {ips['eager']:11.0f} {ips['compiled']:14.0f} "
              f"{ips['compiled'] / ips['eager']:13.2f}x  {loops['eager'].precision}")
        rows.append({"model": model, "norm": norm, "per_worker": n, "workers": w, "memory_format": layout,
                     "precision": loops["eager"].precision, "eager_img_s": round(ips["eager"], 3),
                     "compiled_img_s": round(ips["compiled"], 3),
                     "compiled_over_eager": round(ips["compiled"] / ips["eager"], 4)})
        del loops
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {len(rows)} rows to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--norms", nargs="+", default=["bn", "gn"])
    parser.add_argument("--per-worker", nargs="+", type=int, default=[16, 2], help="N (default: 16 2)")
    parser.add_argument("--workers", nargs="+", type=int, default=[8], help="W (default: 8)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round (default: 12)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds; the best counts")
    parser.add_argument("--images", type=int, default=4096, help="training images to load (default: 4096)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"],
                        help="normlab's memory format (default: auto: both are timed, and what training's probe "
                             "picks is normlab's figure)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="; ".join(f"{name}: {p['help']}" for name, p in PRESETS.items()))
    parser.add_argument("--cuda-graph", default="auto", choices=["auto", "true", "false"],
                        help="normlab's step as a CUDA graph (default: auto, on CUDA)")
    parser.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile normlab's model (trainer.compile); MODE e.g. reduce-overhead, which "
                             "replays the compiled forward and backward as CUDA graphs (the alternative to --cuda-graph)")
    parser.add_argument("--skip-reference", action="store_true",
                        help="time normlab alone (for layout and CUDA-graph ablations); ratio columns stay empty")
    parser.add_argument("--compile-vs-eager", action="store_true",
                        help="time normlab's step eager and compiled instead (no reference loop, no CUDA graph)")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    if args.preset:
        for key, value in PRESETS[args.preset]["args"].items():
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.cuda_graph == "true" and device.type != "cuda":
        parser.error(f"--cuda-graph=true needs a CUDA device; the device here is {device}")
    if args.cuda_graph == "true" and args.compile:
        parser.error("--cuda-graph=true and --compile exclude each other, as trainer.cuda_graph and trainer.compile do")
    cuda_graph = args.cuda_graph == "true" or (args.cuda_graph == "auto" and device.type == "cuda" and not args.compile)
    images, labels, source = load_images(args.images)
    cores = os.cpu_count() or 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} · {name} · data: {source} ({len(labels)} images) · "
          f"reference DataLoader workers: {cores}\n")
    if args.compile_vs_eager:
        rows = compile_vs_eager(args, device, images, labels)
        if args.csv:
            write_csv(args.csv, rows)
        return 0
    header = ["model", "norm", "per_worker", "workers", "total_batch", "device", "normlab_setting",
              "normlab_img_s", "reference_img_s", "ratio", "other_format_img_s", "auto_vs_best_format",
              "normlab_peak_mb", "reference_peak_mb"]
    rows = []
    print("normlab: the memory format trainer.channels_last picks (auto: a probe of both); other: the other format; "
          "auto/best: normlab's img/s over the faster format's\n")
    print(f"{'model':10s} {'norm':5s} {'N':>3s} {'W':>3s} {'N·W':>4s}  {'normlab':>9s} {'other':>7s} {'a/best':>6s} "
          f"{'reference':>9s} {'ratio':>6s}  {'setting':22s} {'peak MB (nl/ref)':>16s}")
    cells = PRESETS[args.preset]["cells"] if args.preset else list(itertools.product(args.per_worker, args.workers))
    for model, norm, (n, w) in itertools.product(args.models, args.norms, cells):
        batch = n * w
        loop = functools.partial(NormlabLoop, model, norm, n, w, images, labels, device, cuda_graph=cuda_graph,
                                 compile=args.compile)
        formats = [args.channels_last == "true"] if args.channels_last != "auto" else list(FORMATS)
        mark = memory_mark(device)
        ours = {fmt: loop(channels_last=fmt) for fmt in formats}
        t_ours = {fmt: measure(candidate, args.steps, args.warmup) for fmt, candidate in ours.items()}
        m_ours = peak_since(mark, device)
        ref, t_ref, m_ref = None, None, None
        if not args.skip_reference:
            mark = memory_mark(device)  # normlab's loops stay resident, and idle, while the reference runs
            ref = ReferenceLoop(model, norm, batch, images, labels, device, cores)
            t_ref = measure(ref, args.steps, args.warmup)
            m_ref = peak_since(mark, device)
        for _ in range(args.rounds - 1):  # alternate, keep the best of each
            t_ours = {fmt: min(t, ours[fmt].run(args.steps)) for fmt, t in t_ours.items()}
            t_ref = t_ref if ref is None else min(t_ref, ref.run(args.steps))
        picked = probed_format(loop, batch, device) if args.channels_last == "auto" else formats[0]
        ips = {fmt: args.steps * batch / t for fmt, t in t_ours.items()}
        ours_ips = ips[picked]
        ref_ips = None if ref is None else args.steps * batch / t_ref
        ratio = None if ref is None else ours_ips / ref_ips
        vs_best = ours_ips / max(ips.values())
        memory = "–" if m_ours is None else f"{m_ours:.0f}/{'–' if m_ref is None else f'{m_ref:.0f}'}"
        other = "–" if len(ips) == 1 else f"{ips[not picked]:.0f}"
        print(f"{model:10s} {norm:5s} {n:3d} {w:3d} {batch:4d}  {ours_ips:9.0f} {other:>7s} {vs_best:6.2f} "
              f"{'–' if ref is None else f'{ref_ips:.0f}':>9s} {'–' if ratio is None else f'{ratio:5.2f}x':>6s}  "
              f"{ours[picked].setting:22s} {memory:>16s}")
        rows.append(dict(zip(header, [model, norm, n, w, batch, name, ours[picked].setting, round(ours_ips, 3),
                                      ref_ips and round(ref_ips, 3), ratio and round(ratio, 4),
                                      None if len(ips) == 1 else round(ips[not picked], 1), round(vs_best, 3),
                                      m_ours, m_ref])))
        if ref is not None:
            del ref.iterator, ref.loader  # stops its DataLoader workers
        del ours, ref  # this cell's data, model and graph pool go before the next cell's memory mark
    if args.csv:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
