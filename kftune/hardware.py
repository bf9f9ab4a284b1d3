"""What this machine computes fast: bf16 only where it is native, threads only as many as we may use.

Both rules are pure functions of detected facts, so each branch is testable on any machine.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# CPU flags under which torch's bf16 kernels run natively (x86: AVX512_BF16 / AMX; Arm: FEAT_BF16)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
BF16_SETTINGS = ("auto", "true", "false")
KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's
KERNEL_CACHE_CAPACITY = 64


@dataclass(frozen=True)
class Choice:
    value: object
    reason: str


def cpu_flags(cpuinfo: str | Path | None = None) -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo does not exist.

    KFTUNE_CPUINFO names another file to read, so a test can present any CPU to a whole run.
    """
    cpuinfo = cpuinfo or os.environ.get("KFTUNE_CPUINFO", "/proc/cpuinfo")
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def choose_bf16(setting: str, device: str, cuda_bf16: bool, flags: set[str]) -> Choice:
    """The precision rule: bf16 only where the hardware computes it natively, unless forced.

    Args:
        setting: finetune.bf16 — auto, true (force, warn where emulated) or false.
        device: "cuda" or "cpu", where the model runs.
        cuda_bf16: whether the CUDA device computes bf16 natively (Ampere or later:
            torch.cuda.is_bf16_supported(including_emulation=False)).
        flags: the CPU's feature flags (cpu_flags()).
    """
    if device == "cuda":
        native, where = cuda_bf16, "the CUDA device " + ("supports bf16" if cuda_bf16 else "has no bf16")
    else:
        found = sorted(set(NATIVE_BF16_FLAGS) & flags)
        native = bool(found)
        where = f"the CPU has {', '.join(found)}" if found else "the CPU has no native bf16 (no AVX512_BF16/AMX)"
    if setting == "false":
        return Choice(False, "finetune.bf16=false")
    if setting == "true":
        if not native:
            log.warning("finetune.bf16=true but %s: bf16 is emulated there and much slower than fp32", where)
        return Choice(True, f"finetune.bf16=true ({where})")
    return Choice(native, f"finetune.bf16=auto: {where}")


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", own: str | Path = "/proc/self/cgroup") -> float | None:
    """CPUs allowed by the cgroup quota (a container's or pod's CPU limit), None when unlimited: the smallest quota
    from this process's own cgroup (`own`: a systemd unit's CPUQuota, a container sharing the host's cgroup
    namespace) up to the root (what a container with a namespace of its own sees), in cgroup v2 and v1."""
    root = Path(root)
    try:
        lines = [line.split(":", 2) for line in Path(own).read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        lines = []
    v2 = next((path for hid, _, path in lines if hid == "0"), "/")
    v1 = next((path for _, controllers, path in lines if "cpu" in controllers.split(",")), "/")
    limits = []
    for base, path, read in ((root, v2, _v2_quota), (root / "cpu", v1, _v1_quota)):
        folder = base.joinpath(*[p for p in path.split("/") if p not in ("", ".", "..")])
        for where in (folder, *folder.parents):
            if (quota := read(where)) is not None:
                limits.append(quota)
            if where == base:
                break
    return min(limits, default=None)


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]  # "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())  # -1: unlimited
        return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def choose_threads(setting: int, affinity: int, quota: float | None, processes: int = 1) -> Choice:
    """The thread rule: finetune.threads if set, else the cores this process may use, shared with the other
    `processes` of one job on this machine (torchrun's LOCAL_WORLD_SIZE).

    torch defaults to the host's core count, which oversubscribes a container limited by a quota
    or a process pinned to fewer cores (and then runs slower than with fewer threads).
    """
    if setting:
        return Choice(setting, f"finetune.threads={setting}")
    if quota is not None and math.ceil(quota) < affinity:
        cores, why = max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g} of {affinity} usable cores"
    else:
        cores, why = max(1, affinity), f"{affinity} usable cores (sched_getaffinity)"
    if processes > 1:
        return Choice(max(1, cores // processes), f"{why}, shared by {processes} processes (LOCAL_WORLD_SIZE)")
    return Choice(cores, why)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def allocator(maps: str | Path = "/proc/self/maps") -> str:
    """The malloc this process runs with: tcmalloc or jemalloc when preloaded (LD_PRELOAD, as the image and
    `make run` do where the library is installed), else the C library's."""
    try:
        text = Path(maps).read_text(errors="replace")
    except OSError:
        return "unknown"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in text), "libc malloc")


def threads_here(setting: int = 0) -> Choice:
    """The thread rule applied to this process: its affinity and its cgroup's CPU quota."""
    return choose_threads(setting, usable_cores(), cgroup_cpu_limit(), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def apply_threads(setting: int) -> Choice:
    """Give torch as many intra-op threads as the thread rule says."""
    import torch

    threads = threads_here(setting)
    torch.set_num_threads(int(threads.value))
    return threads


def bound_kernel_caches() -> None:
    """Keep at most KERNEL_CACHE_CAPACITY compiled kernels in oneDNN's and ideep's caches (1,024 each by default).

    They hold one kernel per distinct shape, some MB apiece, and length-grouped training batches bring many
    shapes: over a MiniLM fine-tune they grew the process by about 300 MB. With 64 the speed was the same
    (AMD EPYC, Zen 4, bf16: a default fine-tune's peak RSS 1,664-1,751 -> 1,379-1,389 MB with tcmalloc,
    1,948 -> 1,623 MB with glibc). Training only: batch prediction's int8 path was 10-15% slower with 64.
    Read once, at the first kernel, so call it before any tensor work; a value in the environment wins.
    """
    for var in KERNEL_CACHE_VARS:
        os.environ.setdefault(var, str(KERNEL_CACHE_CAPACITY))


def setup(setting_bf16: str, setting_threads: int) -> dict:
    """Apply the thread rule to torch and decide the precision; return what was chosen and why."""
    import torch

    threads = apply_threads(setting_threads)
    cuda = torch.cuda.is_available()
    # including_emulation=False: torch's default also says yes on pre-Ampere GPUs, which only emulate bf16
    native = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    bf16 = choose_bf16(setting_bf16, "cuda" if cuda else "cpu", native, cpu_flags())
    choice = {"precision": "bf16" if bf16.value else "fp32", "precision_reason": bf16.reason,
              "threads": int(threads.value), "threads_reason": threads.reason, "allocator": allocator()}
    log.info("precision %s (%s); %d torch threads (%s); %s", choice["precision"], bf16.reason, threads.value,
             threads.reason, choice["allocator"])
    return choice


def bf16_for(cfg) -> bool:
    """Apply `finetune.threads` and decide `finetune.bf16` for a step that predicts (evaluate, drift, gate)."""
    return setup(cfg.bf16, cfg.threads)["precision"] == "bf16"
