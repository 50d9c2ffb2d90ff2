"""Whether this CPU multiplies bf16 natively, and so which precision a CPU run should use.

PyTorch runs bf16 matmuls on any x86 CPU, but only CPUs with `avx512_bf16` or `amx_bf16` do them
in hardware: there they are ~5x faster than fp32; elsewhere (AVX2-only machines) they are emulated
and ~20x slower (1.25 s against 0.06 s for a 2048x512 @ 512x512 matmul on one AVX2 EPYC core).
Arm CPUs (whose `Features` may list `bf16`) count as not native: unmeasured here, so fp32 is the
safe default there and `--precision`/`deepspeed.precision` choose otherwise.
"""
from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in a /proc/cpuinfo text (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This machine's CPU flags; empty where /proc/cpuinfo is absent (macOS, Windows)."""
    try:
        return parse_cpu_flags(path.read_text())
    except OSError:
        return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def cpu_training_precision(flags: frozenset[str] | None = None) -> str:
    """bf16 where the CPU multiplies it natively, else fp32 (emulated bf16 is the slower one)."""
    return "bf16" if has_native_bf16(flags) else "fp32"


def emulated_bf16_warning(precision: str, on_cuda: bool, flags: frozenset[str] | None = None) -> str | None:
    """A one-line warning for bf16 training on a CPU that emulates it, else None."""
    if precision != "bf16" or on_cuda or has_native_bf16(flags):
        return None
    return ("deepspeed.precision=bf16 on a CPU without avx512_bf16/amx_bf16: bf16 matmuls are emulated here "
            "(~20x slower than fp32); --set deepspeed.precision=fp32 trains much faster on this machine")
