"""Timing and peak memory of a piece of work, shared by the benchmark and the GPU check.

``median_seconds`` times a callable after warm-up (wall and process CPU time, synchronising CUDA);
``peak_memory`` measures the memory a block needs above its level at entry (CUDA allocator or the CPU's
resident set); ``profile_table`` lists the ops that took the most time in one call; ``matmul_flop_rate`` is
the denominator of MFU; ``free_memory`` clears what one measurement left before the next; ``device_name``
names the card or CPU a figure was measured on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

MIB = 2**20
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


# -- memory ----------------------------------------------------------------------------------------------
def _proc_status_mib(field: str) -> float:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in MiB."""
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where Linux does not allow it."""
    try:
        PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Hand memory that glibc keeps after ``free`` back to the kernel, so RSS starts from what is in use."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _ru_maxrss_mib() -> float:
    """This process's lifetime peak RSS (``resource``; KiB on Linux, bytes on macOS), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Peak memory the block needs above the level at entry: fills ``{"mib": ..., "method": ...}`` on exit.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: peak resident set size (RSS) of the process, with freed
    heap memory released and the kernel's peak mark reset at entry (Linux); elsewhere the increase of the
    lifetime peak ``ru_maxrss``, which is 0 when an earlier measurement peaked higher.
    """
    result: dict = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device) / MIB
        yield result
        torch.cuda.synchronize(device)
        result.update(mib=torch.cuda.max_memory_allocated(device) / MIB - start, method="cuda max_memory_allocated")
    elif _reset_rss_peak():
        _release_free_heap()
        _reset_rss_peak()
        start = _proc_status_mib("VmRSS")
        yield result
        result.update(mib=_proc_status_mib("VmHWM") - start, method="peak RSS (/proc VmHWM, reset per pass)")
    else:
        start = _ru_maxrss_mib()
        yield result
        result.update(mib=_ru_maxrss_mib() - start, method="ru_maxrss increase (lower bound)")


# -- timing ----------------------------------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> dict:
    """Median wall time and median process CPU time of ``run`` over ``repeats`` calls, after ``warmup`` calls.

    CPU time sums this process's threads and leaves out the time it waited for a core, so on a machine shared
    with other jobs it is the steadier of the two with one thread (with more, threads waiting for each other
    also count).
    """
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(repeats):
        _synchronize(device)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        run()
        _synchronize(device)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def profile_table(run: Callable[[], None], device: torch.device, rows: int) -> str:
    """The ``rows`` ops with the largest own time (self time, children excluded) in one call of ``run``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        run()
        _synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


def matmul_flop_rate(size: int, device: torch.device) -> float:
    """FLOP/s of a ``size``^3 matrix product, bf16 on CUDA and fp32 on a CPU (median of 10 after 3 warm-ups)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / median_seconds(lambda: a @ b, 3, 10, device)["wall"]


def free_memory() -> None:
    """Drop what the last measurement left: compiled graphs, garbage, the CUDA caching allocator's free blocks."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from atlas.profiling import cpu_name

    return cpu_name() or platform.processor() or "unknown CPU"
