"""The CPU kernel's shared library (cpu_kernel.cpp): built once per machine, trusted only if it is this user's own,
loaded only if its entry points take the arguments normlab passes.

It is plain C++ (no torch headers, so it builds quickly), compiled with ``$CXX`` (else ``c++``) and
``-O3 -march=native -fopenmp`` into normlab's cache folder under a name hashed from the source, the compiler, the
flags and the CPU, so an edit, another compiler or another CPU builds afresh.

Loading: the file is opened without following a symlink, checked through that open descriptor (a regular file,
this user's, writable by no one else; its folders up to the cache root too), and loaded through the same
descriptor (``/proc/self/fd/N``), so nothing can swap it between the check and the load. Then its
``normlab_kernel_abi`` symbol must spell the argument lists :data:`SIGNATURES` declares: a library whose
prototypes drifted from the Python calls is refused instead of being called with the wrong arguments. A cached
library that fails any of this is rebuilt once; whatever still fails is returned as the reason, and the norms
run on torch's ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from normlab.cache import cache_dir, private_folder, untrusted_because

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
FLAGS = ("-std=c++17", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 300

_I32, _I64, _F64, _PTR = ctypes.c_int, ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
SIGNATURES: dict[str, list[type]] = {  # each entry point's argument types, in the order Python passes them
    "normlab_norm_forward": [_I32, *[_PTR] * 7, *[_I64] * 5, _I32, _F64, _I32],
    "normlab_norm_backward": [_I32, *[_PTR] * 8, *[_I64] * 5, _I32, _I32],
    "normlab_running_update": [_I32, *[_PTR] * 4, _F64, _I64, _I64, _F64],
}
_CODES = {_I32: "i", _I64: "q", _F64: "d", _PTR: "p"}


def abi() -> str:
    """The argument lists of :data:`SIGNATURES` as the library's ``normlab_kernel_abi()`` spells them."""
    return ";".join(f"{name}({','.join(_CODES[t] for t in types)})" for name, types in SIGNATURES.items())


@dataclass(frozen=True)
class Library:
    """The loaded kernel and the file it came from."""

    functions: ctypes.CDLL
    path: Path


def compiler() -> list[str] | None:
    """The C++ compiler's command: ``$CXX`` (a wrapper such as ``ccache g++`` included), else ``c++``; None if
    it is not on PATH."""
    command = shlex.split(os.environ.get("CXX", "c++"))
    found = shutil.which(command[0]) if command else None
    return [found, *command[1:]] if found else None


def _cpu_identity() -> str:
    """The CPU's model and instruction-set flags: what ``-march=native`` compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def library_path(cxx: list[str]) -> Path:
    version = subprocess.run([*cxx, "--version"], check=False, capture_output=True, timeout=60).stdout.decode(errors="replace")
    identity = [SOURCE.read_text(), " ".join(cxx), version, " ".join(FLAGS), _cpu_identity()]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_kernel-{digest}.so"


def build(cxx: list[str], path: Path) -> None:
    """Compile SOURCE into `path`, atomically: each build writes a file of its own and renames it into place."""
    private_folder(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    partial = Path(name)
    try:
        done = subprocess.run([*cxx, *FLAGS, "-o", str(partial), str(SOURCE)], check=False, capture_output=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode:
            message = (done.stderr or done.stdout).decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"{' '.join(cxx)} failed: {message}")
        os.chmod(partial, 0o755)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load(path: Path) -> Library:
    """The library at `path`, opened without following links, checked and loaded through one descriptor, its
    argument lists checked; OSError or RuntimeError saying why it is refused."""
    private_folder(path.parent)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        reason = "not a regular file" if not stat.S_ISREG(info.st_mode) else untrusted_because(info)
        if reason:
            raise RuntimeError(f"{path} is {reason}; not loaded")
        functions = ctypes.CDLL(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    check_abi(functions, path)
    for name, types in SIGNATURES.items():
        entry = getattr(functions, name)
        entry.argtypes, entry.restype = types, _I32
    return Library(functions, path)


def check_abi(functions: ctypes.CDLL, path: Path) -> None:
    """RuntimeError unless the library's ``normlab_kernel_abi()`` spells :func:`abi`."""
    try:
        symbol = functions.normlab_kernel_abi
    except AttributeError:
        raise RuntimeError(f"{path.name} has no normlab_kernel_abi symbol: an older or foreign library") from None
    symbol.argtypes, symbol.restype = [], ctypes.c_char_p
    found = (symbol() or b"").decode(errors="replace")
    if found != abi():
        raise RuntimeError(f"{path.name}'s argument lists {found!r} differ from the ones normlab passes {abi()!r}")


@functools.cache
def library() -> Library | str:
    """The loaded kernel, or why there is none. A cached library that is refused or does not load is built afresh
    (once)."""
    if os.environ.get("NORMLAB_CPU_KERNEL", "1") == "0":
        return "NORMLAB_CPU_KERNEL=0"
    cxx = compiler()
    if cxx is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    try:
        path = library_path(cxx)
        try:
            return load(path)
        except (OSError, RuntimeError):
            pass
        build(cxx, path)
        return load(path)
    except Exception as error:  # noqa: BLE001 - whatever stops the kernel, torch's ops take over, and say why
        return f"building or loading {SOURCE.name} failed: {error}"
