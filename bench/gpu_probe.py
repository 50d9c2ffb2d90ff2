"""What the GPU machine has, and what only it can say about the flash kernels (docs/gpu.md):

- the GPU, torch and CUDA versions, nvcc and Python.h (DeepSpeed's JIT-built fused Adam needs both);
- whether PyTorch's FlashAttention-2 aten ops run there, the schema they have, and the layout of
  the log-sum-exp they return for a varlen batch ([H, total_q] expected), checked against the
  pure-PyTorch pair; the same for the public `torch.nn.attention.varlen.varlen_attn`;
- which pair `flash_kernel: auto` picks, and which carried packages import.

    python bench/gpu_probe.py [--json FILE]      # runs anywhere; the CUDA parts only with CUDA
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CARRIED_IMPORTS = ("deepspeed", "webdataset", "pydantic", "hjson", "numba", "safetensors", "matplotlib")


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:300]}"


def toolchain() -> dict:
    nvcc = shutil.which("nvcc")
    info = {"nvcc": None, "python_h": Path(sysconfig.get_paths()["include"], "Python.h").exists()}
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        info["nvcc"] = out[-1] if out else nvcc
    return info


def packages() -> dict:
    found = {}
    for name in CARRIED_IMPORTS:
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # reported, not raised
            found[name] = f"missing ({_error(err)})"
    return found


def lse_probe(device) -> dict:
    """One tiny varlen batch through the aten forward: the raw lse shape, its layout, and out/lse
    against the pure-PyTorch pair."""
    import torch

    from celljepa_dist.model.aten_varlen import detect_lse_layout, lse_to_packed
    from celljepa_dist.model.flash_varlen import TORCH_KERNELS

    lens, heads, dim = [5, 1, 3], 2, 16
    cu = torch.tensor([0, 5, 6, 9], dtype=torch.int32, device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(sum(lens), heads, dim, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    scale = 1 / math.sqrt(dim)
    raw = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max(lens), max(lens), 0.0, False, False,
                                                  scale=scale)
    out, lse = raw[0], raw[1]
    layout = detect_lse_layout(lse.shape, len(lens), sum(lens), heads, max(lens))
    ref_out, ref_lse = TORCH_KERNELS.forward(q, k, v, cu, cu, max(lens), max(lens), 0.0, scale, False)[:2]
    result = {"raw_lse_shape": list(lse.shape), "raw_lse_dtype": str(lse.dtype), "layout": layout.kind,
              "returns": [list(getattr(t, "shape", [])) for t in raw],
              "lse_max_abs_diff_vs_torch_pair": float((lse_to_packed(lse, layout, cu) - ref_lse).abs().max()),
              "out_max_abs_diff_vs_torch_pair": float((out.float() - ref_out.float()).abs().max())}
    try:
        from torch.nn.attention import varlen

        params = inspect.signature(varlen.varlen_attn).parameters
        result["varlen_attn_params"] = list(params)
        if "return_aux" in params:
            _, lse_pub = varlen.varlen_attn(q, k, v, cu, cu, max(lens), max(lens),
                                            return_aux=varlen.AuxRequest(lse=True))
            pub = detect_lse_layout(lse_pub.shape, len(lens), sum(lens), heads, max(lens))
            result["varlen_attn_lse_shape"], result["varlen_attn_layout"] = list(lse_pub.shape), pub.kind
    except Exception as err:  # the public API is optional (2.10+)
        result["varlen_attn"] = _error(err)
    return result


def probe() -> dict:
    import torch

    from celljepa_dist.model.aten_varlen import check_aten_schema
    from celljepa_dist.model.flash_varlen import aten_flash_available, flash_attn_installed, resolve_kernels

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "flash_attn_installed": flash_attn_installed(),
            **toolchain(), "packages": packages()}
    try:
        check_aten_schema()
        info["aten_schema"] = "ok"
    except RuntimeError as err:
        info["aten_schema"] = str(err)
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        info["aten_forward_schema"] = str(torch.ops.aten._flash_attention_forward.default._schema)
        info["aten_backward_schema"] = str(torch.ops.aten._flash_attention_backward.default._schema)
    if not torch.cuda.is_available():
        return info
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    info.update({"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                 "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "aten_flash_available": aten_flash_available(device)})
    try:
        info["auto_kernel"] = resolve_kernels("auto", device).name
    except RuntimeError as err:
        info["auto_kernel"] = _error(err)
    try:
        info["lse"] = lse_probe(device)
    except Exception as err:  # what failed is the finding
        info["lse"] = {"error": _error(err)}
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    info = probe()
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        from celljepa_dist.atomic import atomic_write_text

        atomic_write_text(args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
