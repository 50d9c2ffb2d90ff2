"""The Python packages the GPU machine lacks, carried to it as wheels (`gpu_wheels/`, git-ignored).

The GPU machine has a fixed image (Python 3.12, torch 2.11 + CUDA 13, triton, numpy, pandas, numba,
safetensors, pytest, ...: `DEVICE_PACKAGES`, as the device notes list them) and no network. What
training and the checks import beyond it travels as wheels, pinned to the versions installed here
(the ones the CPU tests ran with):

    python bench/gpu_wheels.py [--dest gpu_wheels] [--dry-run]   # here, with the package index

DeepSpeed is published as an sdist only: it is built here into a pure-Python wheel
(`pip wheel --no-build-isolation`, no ops compiled; CUDA ops are JIT-built on the GPU, and
DeepSpeed only compares torch versions for ops compiled ahead). The rest are binary wheels for
CPython 3.12 manylinux x86-64. `gpu_wheels/MANIFEST.json` lists what was fetched; the device side
(`bench/gpu_check.sh`) installs them with `pip install --no-index --no-deps --target`.

`blocked_imports` names the top-level modules installed here that the GPU machine would not have:
a CPU test runs the device-side steps with those imports refused, which is how the wheel list is
known to be complete without a GPU.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / "gpu_wheels"
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# What travels with the working tree is capped at 64 MiB; the tree itself is ~1 MiB.
WHEELS_BUDGET_MB = 48.0

# The GPU image's packages (device notes, read on a machine running it, 2026-11-17).
DEVICE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

# Carried: DeepSpeed and its needs the image lacks, the shard reader's webdataset, and MLflow's
# tracking client with its local sqlite store (training logs cells/s, MFU and memory there).
SDIST_BUILT = ("deepspeed",)
WHEELS = (
    "deepspeed", "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    "webdataset", "braceexpand",
)


def normalize(name: str) -> str:
    """PEP 503 name: what pip and the package index compare."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(names=WHEELS) -> dict[str, str]:
    """{name: version installed here}; raises naming a package that is not installed here."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.prefix}: the wheels are pinned to this "
                             "environment's versions; run from the project's venv") from None
    return found


def download_commands(versions: dict[str, str], dest: Path, python: str = sys.executable) -> list[list[str]]:
    """The pip commands that put every wheel in `dest` (pure): binary wheels for the device's
    Python, DeepSpeed's sdist downloaded then built into a wheel against this torch."""
    cmds = []
    binary = [f"{n}=={v}" for n, v in versions.items() if n not in SDIST_BUILT]
    if binary:
        platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
        cmds.append([python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                     DEVICE_PYTHON, "--implementation", "cp", *platform_args, "-d", str(dest), *binary])
    for name in SDIST_BUILT:
        if name in versions:
            sdists = dest / "sdist"
            cmds.append([python, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", str(sdists),
                         f"{name}=={versions[name]}"])
            cmds.append([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest),
                         f"{name}=={versions[name]}", "--no-index", "--find-links", str(sdists)])
    return cmds


def wheel_files(dest: Path) -> list[Path]:
    return sorted(dest.glob("*.whl"))


def check_wheels(dest: Path, versions: dict[str, str], budget_mb: float = WHEELS_BUDGET_MB) -> dict:
    """One wheel per pinned package at its version, nothing else, within the size budget; returns
    the manifest. Raises ValueError naming what is missing, extra or too large."""
    files = wheel_files(dest)
    want = {normalize(n): v for n, v in versions.items()}
    by_name: dict[str, list[Path]] = {}
    for f in files:
        name, version = f.name.split("-")[:2]  # wheel names: {distribution}-{version}-...
        by_name.setdefault(normalize(name), []).append(f)
        if normalize(name) not in want:
            raise ValueError(f"{f}: not in the wheel list (bench/gpu_wheels.py WHEELS); remove it: the device "
                             "must get exactly the list")
        if version != want[normalize(name)]:
            raise ValueError(f"{f}: version {version}, expected {want[normalize(name)]} (the version installed here)")
    missing = sorted(n for n in versions if normalize(n) not in by_name)
    if missing:
        raise ValueError(f"{dest}: no wheel for {', '.join(missing)}")
    doubles = sorted(n for n, fs in by_name.items() if len(fs) > 1)
    if doubles:
        raise ValueError(f"{dest}: several wheels of {', '.join(doubles)}")
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    if size_mb > budget_mb:
        raise ValueError(f"{dest}: {size_mb:.1f} MiB of wheels, over the {budget_mb:.0f} MiB that may travel")
    return {"python": DEVICE_PYTHON, "size_mb": round(size_mb, 2),
            "wheels": [{"file": f.name, "bytes": f.stat().st_size} for f in files]}


def prepare(dest: Path = DEFAULT_DEST, dry_run: bool = False) -> dict | None:
    versions = pins()
    cmds = download_commands(versions, dest)
    for cmd in cmds:
        print(" ".join(cmd), flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True)
    if dry_run:
        return None
    shutil.rmtree(dest / "sdist", ignore_errors=True)  # built into its wheel; it would only travel
    manifest = check_wheels(dest, versions)
    from celljepa_dist.atomic import atomic_write_text

    atomic_write_text(dest / "MANIFEST.json", json.dumps(manifest, indent=2))
    print(f"gpu_wheels {len(manifest['wheels'])} wheels, {manifest['size_mb']} MiB in {dest}")
    return manifest


def with_requirements(names) -> set[str]:
    """`names` and, recursively, what their versions installed here require (extras left out):
    the image's packages were installed with their dependencies, even those its list omits."""
    from packaging.requirements import Requirement

    seen, todo = set(), [normalize(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalize(req.name))
    return seen


def blocked_imports(allowed=None) -> list[str]:
    """Top-level modules installed here whose distributions are all absent from the GPU machine
    (neither in its image, nor required by it, nor carried): importing one there would fail.
    Carried wheels are installed without their dependencies, so only the image's are followed."""
    allowed = with_requirements(DEVICE_PACKAGES) | {normalize(n) for n in WHEELS} if allowed is None else \
        {normalize(n) for n in allowed}
    allowed.add("celljepa-dist")  # the project travels as the working tree
    return sorted(mod for mod, dists in metadata.packages_distributions().items()
                  if not any(normalize(d) in allowed for d in dists))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=str(DEFAULT_DEST))
    p.add_argument("--dry-run", action="store_true", help="print the pip commands, fetch nothing")
    args = p.parse_args(argv)
    prepare(Path(args.dest), args.dry_run)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
