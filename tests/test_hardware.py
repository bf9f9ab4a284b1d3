"""The precision and thread rules, both branches on any machine (the detected facts are inputs)."""

import glob
import os
import subprocess
import sys

import pytest

from kftune.hardware import (KERNEL_CACHE_VARS, allocator, bound_kernel_caches, cgroup_cpu_limit, choose_bf16,
                             choose_threads, cpu_flags)
from kftune.steps.finetune import finetune
from tests.conftest import with_changes

AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}


@pytest.mark.parametrize("setting, flags, expected", [
    ("auto", AVX2_ONLY, False), ("auto", AVX512_BF16, True), ("auto", AVX2_ONLY | {"amx_bf16"}, True),
    ("auto", {"fp", "asimd", "bf16"}, True), ("auto", set(), False),
    ("false", AVX512_BF16, False), ("true", AVX2_ONLY, True),
])
def test_bf16_only_where_the_cpu_computes_it_natively(setting, flags, expected):
    choice = choose_bf16(setting, "cpu", cuda_bf16=False, flags=flags)
    assert choice.value is expected
    assert f"finetune.bf16={setting}" in choice.reason


def test_bf16_on_cuda_follows_the_device_not_the_cpu():
    assert choose_bf16("auto", "cuda", cuda_bf16=True, flags=set()).value is True
    assert choose_bf16("auto", "cuda", cuda_bf16=False, flags=AVX512_BF16).value is False


def test_forcing_bf16_where_it_is_emulated_warns(caplog):
    choose_bf16("true", "cpu", cuda_bf16=False, flags=AVX2_ONLY)
    assert "emulated" in caplog.text


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    (tmp_path / "x86").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(tmp_path / "x86") == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "arm") == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("setting, affinity, quota, expected", [
    (0, 2, None, 2), (0, 64, 2.0, 2), (0, 64, 1.5, 2), (0, 4, 0.5, 1), (0, 2, 8.0, 2), (3, 64, 2.0, 3),
])
def test_threads_default_to_the_cores_this_process_may_use(setting, affinity, quota, expected):
    assert choose_threads(setting, affinity, quota).value == expected


def test_the_processes_of_one_torchrun_job_share_the_cores():
    assert choose_threads(0, 16, None, processes=2).value == 8
    assert choose_threads(0, 2, None, processes=4).value == 1 and choose_threads(0, 64, 4.0, processes=2).value == 2
    assert "shared by 2 processes" in choose_threads(0, 16, None, processes=2).reason
    assert choose_threads(3, 16, None, processes=2).value == 3, "a setting wins"


def test_kernel_caches_are_bounded_unless_the_environment_says(monkeypatch):
    onednn, ideep = KERNEL_CACHE_VARS
    monkeypatch.delenv(onednn, raising=False)
    monkeypatch.setenv(ideep, "8")
    bound_kernel_caches()
    assert os.environ[onednn] == "64" and os.environ[ideep] == "8"


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "v2") == 1.5
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path / "v2") is None
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "v1") == 2.0
    assert cgroup_cpu_limit(tmp_path / "none") is None


def test_a_quota_on_the_processs_own_cgroup_or_a_parent_counts_not_only_the_roots(tmp_path):
    """A systemd unit's CPUQuota or a container sharing the host's cgroup namespace: the limit is on the process's
    own cgroup (or one above it), which /proc/self/cgroup names; the smallest on the way up wins."""
    own = tmp_path / "self-cgroup"
    own.write_text("0::/system.slice/job.scope/worker\n")
    root = tmp_path / "v2"
    for folder, limit in (("", "max 100000"), ("system.slice", "max 100000"),
                          ("system.slice/job.scope", "300000 100000"), ("system.slice/job.scope/worker", "max 100000")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(limit + "\n")
    assert cgroup_cpu_limit(root, own) == 3.0
    (root / "system.slice/job.scope/worker/cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(root, own) == 1.5
    own.write_text("12:cpu,cpuacct:/docker/abc\n11:cpuset:/docker/abc\n")  # cgroup v1, the host's namespace
    (tmp_path / "v1" / "cpu" / "docker" / "abc").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "v1" / "cpu" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "v1", own) == 0.5
    assert cgroup_cpu_limit(tmp_path / "none", own) is None


@pytest.mark.parametrize("flags, precision", [(AVX2_ONLY, "fp32"), (AVX512_BF16, "bf16")])
def test_a_default_run_trains_in_bf16_only_on_a_cpu_with_native_bf16(prepared, params, tmp_path, monkeypatch,
                                                                       flags, precision):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {' '.join(sorted(flags))}\n")
    monkeypatch.setenv("KFTUNE_CPUINFO", str(cpuinfo))
    cfg = with_changes(params.finetune, bf16="auto", max_steps=20, eval_every_steps=0)
    summary = finetune(prepared / "tokenized", prepared / "model", params.model.name, cfg)
    assert summary["precision"] == precision
    assert ("avx512_bf16" in summary["precision_reason"]) is (precision == "bf16")
    assert summary["threads"] >= 1 and summary["threads_reason"]
    assert summary["allocator"] in ("libc malloc", "tcmalloc", "jemalloc")


def test_the_allocator_is_read_from_the_process_memory_map(tmp_path):
    maps = tmp_path / "maps"
    line = "7f1c2a000000-7f1c2a021000 r-xp 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/{}\n"
    maps.write_text(line.format("libc.so.6") + line.format("libtcmalloc_minimal.so.4.5.10"))
    assert allocator(maps) == "tcmalloc"
    maps.write_text(line.format("libc.so.6") + line.format("libjemalloc.so.2"))
    assert allocator(maps) == "jemalloc"
    maps.write_text(line.format("libc.so.6"))
    assert allocator(maps) == "libc malloc"
    assert allocator(tmp_path / "missing") == "unknown"


TCMALLOC = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4"))


@pytest.mark.skipif(not TCMALLOC, reason="libtcmalloc-minimal4 is not installed here")
def test_a_preloaded_tcmalloc_is_detected():
    code = "from kftune.hardware import allocator; print(allocator())"
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": TCMALLOC[0]},
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "tcmalloc"
