"""Which precision a CPU run should use: bf16 only where the CPU multiplies it natively."""
from celljepa_dist.cpu_features import (
    cpu_flags,
    cpu_training_precision,
    emulated_bf16_warning,
    has_native_bf16,
    parse_cpu_flags,
)

AVX2_EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx fma avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n"
ZEN4_EPYC = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_flags_are_the_first_processors():
    assert parse_cpu_flags(AVX2_EPYC) == {"fpu", "sse", "sse2", "avx", "fma", "avx2"}
    assert parse_cpu_flags(GRAVITON) == {"fp", "asimd", "bf16", "sve"}
    assert parse_cpu_flags("") == frozenset()


def test_bf16_only_where_native():
    assert cpu_training_precision(parse_cpu_flags(ZEN4_EPYC)) == "bf16"
    assert cpu_training_precision(parse_cpu_flags(SAPPHIRE)) == "bf16"
    assert cpu_training_precision(parse_cpu_flags(AVX2_EPYC)) == "fp32"
    assert cpu_training_precision(frozenset()) == "fp32"


def test_warning_only_for_emulated_bf16_on_cpu():
    avx2 = parse_cpu_flags(AVX2_EPYC)
    assert "deepspeed.precision=fp32" in emulated_bf16_warning("bf16", on_cuda=False, flags=avx2)
    assert emulated_bf16_warning("fp32", on_cuda=False, flags=avx2) is None
    assert emulated_bf16_warning("bf16", on_cuda=True, flags=avx2) is None
    assert emulated_bf16_warning("bf16", on_cuda=False, flags=parse_cpu_flags(ZEN4_EPYC)) is None


def test_this_machine_reads_consistently(tmp_path):
    assert has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert cpu_flags(tmp_path / "absent") == frozenset()
