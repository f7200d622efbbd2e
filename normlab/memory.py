"""Sizes checked before allocating: a data set or a batch that cannot fit is refused with its figure.

Without this, ``data=synthetic data.size=20000`` asks the allocator for hundreds of GB and dies deep in torch.
``check_fits`` compares an estimate (bytes, from the shape alone) with what this machine (``MemAvailable``,
and the cgroup's limit where one is set) or the device (``torch.cuda.mem_get_info``) has free, and raises a
``ConfigError`` that says both figures and which option to change.
"""

from __future__ import annotations

from pathlib import Path

import torch

from normlab.errors import ConfigError

FLOAT_BYTES = 4  # a normalized batch on the device is float32 (autocast casts inside the model)


def _read_int(path: str, key: str | None = None) -> int | None:
    """An integer from a /proc or /sys file (the value after `key:` in kB for meminfo); None if absent."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    if key is None:
        text = text.strip()
        return int(text) if text.isdigit() else None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def host_available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, or less under a cgroup (v2) limit."""
    figures = [_read_int("/proc/meminfo", "MemAvailable")]
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        figures.append(max(0, limit - used))
    figures = [f for f in figures if f is not None]
    return min(figures) if figures else None


def device_available_bytes(device: torch.device) -> int:
    """The GPU's free bytes."""
    return torch.cuda.mem_get_info(device)[0]


def image_bytes(images: int, channels: int, size: int, bytes_per_value: int = 1) -> int:
    """Bytes of `images` images of channels × size × size values."""
    return images * channels * size * size * bytes_per_value


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_fits(need: int, available: int | None, what: str, where: str, instead: str) -> None:
    """Refuse (ConfigError) when `need` bytes of `what` exceed what `where` has `available`."""
    if available is not None and need > available:
        raise ConfigError(f"{what} needs {gb(need)}, more than the {gb(available)} {where} has free; nothing was "
                          f"allocated. {instead}")


def check_in_memory_set(data, shape) -> None:
    """A data set that is loaded whole (uint8) must fit in the machine's memory."""
    need = image_bytes(shape.train_size + shape.test_size, shape.channels, shape.size)
    if data.name == "synthetic":
        what = (f"data=synthetic (data.num_train={data.num_train} + data.num_test={data.num_test} images of "
                f"{shape.channels} × {shape.size} × {shape.size} bytes)")
        instead = "Use a smaller data.size, data.num_train or data.num_test"
    elif data.name == "imagefolder":
        what = f"the decoded image folder ({shape.train_size + shape.test_size} images at {shape.size} px)"
        instead = ("Lower data.in_memory_max_gb below the free memory to stream it from disk instead, or use a "
                   "smaller data.image_size or fewer classes (data.num_classes)")
    else:
        what, instead = f"data={data.name} in memory", "Use a machine with more memory, or a data subset"
    check_fits(need, host_available_bytes(), what, "this machine", instead)


def check_on_device(shape, batch_size: int, device: torch.device, streamed: bool = False) -> None:
    """What sits on a GPU must fit there: a normalized batch and its augmented copy (float32), and the whole data
    set (uint8) unless it streams from disk a batch at a time."""
    if device.type != "cuda":
        return  # on the CPU the set is the one check_in_memory_set counted
    need = 2 * image_bytes(batch_size, shape.channels, shape.size, FLOAT_BYTES)
    if not streamed:
        need += image_bytes(shape.train_size + shape.test_size, shape.channels, shape.size)
    what = f"a batch of {batch_size}" if streamed else f"the data set and a batch of {batch_size}"
    check_fits(need, device_available_bytes(device), f"{what} on {device}", str(device),
               "Use a smaller data.size or data.image_size, a smaller batch, or data that streams "
               "(data=imagefolder with a data.in_memory_max_gb below the set's size)")
