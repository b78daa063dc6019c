"""What this node may use: cores, memory and GPUs, from the kernel's point of view.

A worker inside a container or a Slurm allocation must see the limits it runs
under, not the whole machine's: capacity is the smallest of the physical
figure, the cgroup limit and what the user asked for.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from pathlib import Path

import psutil

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@functools.lru_cache(maxsize=1)
def _own_cgroup_dirs() -> list[Path]:
    """Cgroup directories of this process, v2 unified first, then v1 memory/cpu."""
    dirs: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return dirs
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":
            dirs.append(_CGROUP_ROOT / rel)
        elif "memory" in controllers.split(","):
            dirs.append(_CGROUP_ROOT / "memory" / rel)
        elif "cpu" in controllers.split(","):
            dirs.append(_CGROUP_ROOT / "cpu,cpuacct" / rel)
    return dirs


def _read_limit(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text().strip()
        if text and text != "max":
            value = int(text)
            # cgroup v1 reports "no limit" as a huge page-aligned number.
            return value if value < 2**60 else None
    return None


def cgroup_memory_limit() -> int | None:
    """The tightest memory limit among this process's cgroup and its ancestors."""
    limits: list[int] = []
    for directory in _own_cgroup_dirs():
        current = directory
        while True:
            for name in ("memory.max", "memory.limit_in_bytes"):
                limit = _read_limit(current / name)
                if limit is not None:
                    limits.append(limit)
            if current == _CGROUP_ROOT or current.parent == current or _CGROUP_ROOT not in \
                    current.parents:
                break
            current = current.parent
    return min(limits) if limits else None


def cgroup_cpu_limit() -> float | None:
    for directory in _own_cgroup_dirs():
        with contextlib.suppress(OSError, ValueError):
            quota, period = (directory / "cpu.max").read_text().split()
            if quota != "max":
                return int(quota) / int(period)
        with contextlib.suppress(OSError, ValueError):
            quota_us = int((directory / "cpu.cfs_quota_us").read_text())
            period_us = int((directory / "cpu.cfs_period_us").read_text())
            if quota_us > 0:
                return quota_us / period_us
    return None


def detect_cpus() -> int:
    """Cores this process may run on (affinity), capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def detect_memory(requested: int | None = None) -> int:
    """Smallest of physical memory, the cgroup limit and ``requested``."""
    candidates = [psutil.virtual_memory().total]
    limit = cgroup_memory_limit()
    if limit is not None:
        candidates.append(limit)
    if requested:
        candidates.append(requested)
    return min(candidates)


def detect_gpus() -> list[int]:
    """GPU indices from CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(x) for x in out.split() if x.strip().isdigit()]


def parse_gpu_list(text: str) -> list[int]:
    """``--gpus 0,1,3`` or ``--gpus 4`` (meaning 0..3)."""
    text = text.strip()
    if not text or text == "none":
        return []
    if "," not in text and text.isdigit():
        return list(range(int(text)))
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"cannot read GPU list {text!r}: use e.g. 0,1,3 or a count") from None


def _cgroup_usage(directory: Path) -> int | None:
    """Memory charged to a cgroup, less reclaimable page cache (as `docker stats` does)."""
    usage = None
    for name in ("memory.current", "memory.usage_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            usage = int((directory / name).read_text())
            break
    if usage is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                usage -= int(value)
                break
    return max(0, usage)


@functools.lru_cache(maxsize=1)
def _limited_cgroups() -> tuple[Path, ...]:
    """This process's cgroup and its ancestors that carry a memory limit (they do not
    change while the worker runs; looked up once)."""
    found: list[Path] = []
    for directory in _own_cgroup_dirs():
        current = directory
        while _CGROUP_ROOT in current.parents:
            if any(_read_limit(current / n) is not None
                   for n in ("memory.max", "memory.limit_in_bytes")):
                found.append(current)
            current = current.parent
    return tuple(found)


def cgroup_memory_headroom() -> int | None:
    """Limit minus usage of the tightest-limited cgroup this process is in, if any."""
    best: int | None = None
    for directory in _limited_cgroups():
        for name in ("memory.max", "memory.limit_in_bytes"):
            limit = _read_limit(directory / name)
            if limit is not None:
                usage = _cgroup_usage(directory)
                if usage is not None and (best is None or limit - usage < best):
                    best = limit - usage
    return best
