"""Peak FLOP/s for MFU: a table for known GPUs, a measured dense-matmul peak on CPU."""

from __future__ import annotations

import resource
import time

import torch

from stabletrain.config.schema import GPU_PEAK_TFLOPS


def measured_cpu_peak(seconds: float = 0.3, n: int = 1024) -> float:
    """FLOP/s of an fp32 n×n matmul on this CPU: the ceiling our model's matmuls could reach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_flops(device: torch.device, dtype: str, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    if override_tflops:
        return override_tflops * 1e12, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (bf16 if dtype == "bf16" else fp32) * 1e12, f"{key} datasheet"
        return float("nan"), f"unknown GPU {name!r}: set trainer.peak_tflops"
    return measured_cpu_peak(), "measured fp32 matmul peak of this CPU"


GiB = 1024**3


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def resident_gib() -> float:
    """This process's resident set now (VmRSS), in GiB (its high-water mark where /proc is missing)."""
    try:
        return _proc_status_kib("VmRSS:") / 1024**2
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GiB


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far: allocated device memory on a GPU, the resident set's high-water mark
    (VmHWM) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    try:
        return _proc_status_kib("VmHWM:") / 1024**2
    except (OSError, StopIteration):  # not Linux: ru_maxrss is bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**3
