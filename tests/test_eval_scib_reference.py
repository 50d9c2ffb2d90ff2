"""Our metrics against scib 1.1.5 itself, run the way scGPT runs it, in a separate reference venv.

scib 1.1.5 imports pkg_resources (needs setuptools<70) while torch 2.13 needs setuptools>=77, so scib
never goes into the project venv: this test builds its own venv under ~/.cache/celljepa-scib-ref
(or $CELLJEPA_SCIB_REF_DIR), reused across runs and rebuilt when the project's versions change.
Its numeric stack (numpy, scipy, scanpy, anndata, scikit-learn, louvain, igraph, numba, umap-learn,
pynndescent, ...) is pinned to the versions installed in the project venv, so the kNN graph and the
Louvain runs are the same code: the numbers must agree exactly (we allow 1e-9, the difference
between scib's own ARI formula and sklearn's). Skipped, saying why, when the venv cannot be built
(no package index).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from reference_env import run_or_skip

from celljepa_dist.atomic import atomic_write_text
from celljepa_dist.evaluation import evaluate_embeddings

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")]

SCIB_VERSION = "1.1.5"
REF_DIR = Path(os.environ.get("CELLJEPA_SCIB_REF_DIR", Path.home() / ".cache" / "celljepa-scib-ref"))
# Everything that touches the numbers, pinned to what the project venv has.
PINNED = ["numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "louvain", "igraph", "numba",
          "llvmlite", "pynndescent", "umap-learn", "h5py", "joblib", "threadpoolctl", "networkx", "natsort",
          "matplotlib", "seaborn", "statsmodels", "patsy", "legacy-api-wrap", "session-info2", "zarr", "numcodecs"]

REFERENCE_SCRIPT = r'''
import json, sys, warnings
warnings.filterwarnings("ignore")
import anndata as ad
import scanpy as sc
import scib

path, label_key, batch_key, out = sys.argv[1:5]
keys = sys.argv[5:]
adata = ad.read_h5ad(path)
if not batch_key:  # metrics() requires a batch column; a constant one leaves batch ASW undefined
    adata.obs["_no_batch"] = "b0"
    batch_key = "_no_batch"
results = {"scib": scib.__version__, "scanpy": sc.__version__}
for key in keys:
    # scgpt/utils/util.py::eval_scib_metrics, after sc.pp.neighbors(adata, use_rep=key) as scGPT does.
    a = adata.copy()
    sc.pp.neighbors(a, use_rep=key)
    df = scib.metrics.metrics(
        a, adata_int=a, batch_key=batch_key, label_key=label_key, embed=key,
        isolated_labels_asw_=False, silhouette_=True, hvg_score_=False, graph_conn_=False, pcr_=False,
        isolated_labels_f1_=False, trajectory_=False, nmi_=True, ari_=True, cell_cycle_=False,
        kBET_=False, ilisi_=False, clisi_=False, verbose=False)
    s = df[0]
    # The chosen resolution is not in metrics()' table: opt_louvain again on a fresh copy.
    b = adata.copy()
    sc.pp.neighbors(b, use_rep=key)
    res_max, nmi_max, _ = scib.metrics.opt_louvain(b, label_key=label_key, cluster_key="cluster",
                                                   function=scib.metrics.nmi, verbose=False, inplace=True)
    results[key] = {"nmi": float(s["NMI_cluster/label"]), "ari": float(s["ARI_cluster/label"]),
                    "asw": float(s["ASW_label"]), "batch_asw": float(s["ASW_label/batch"]),
                    "louvain_resolution": float(res_max), "opt_louvain_nmi": float(nmi_max)}
with open(out, "w") as f:
    json.dump(results, f)
'''


def project_pins() -> dict[str, str]:
    pins = {}
    for name in PINNED:
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return pins


def _run(cmd: list[str], what: str, timeout: int = 1800) -> None:
    run_or_skip(cmd, what, "scib", timeout)


def reference_python() -> Path:
    """The reference venv's python, built once (several minutes) and reused while the pins hold."""
    python = REF_DIR / "bin" / "python"
    marker = REF_DIR / "celljepa-ready.json"
    wanted = {"scib": SCIB_VERSION, "pins": project_pins(), "python": sys.version.split()[0]}
    if marker.exists() and json.loads(marker.read_text()) == wanted and python.exists():
        return python
    shutil.rmtree(REF_DIR, ignore_errors=True)
    REF_DIR.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(REF_DIR)], "python -m venv")
    _run([str(python), "-m", "pip", "install", "-q", "setuptools<70", "wheel"], "pip install setuptools<70")
    constraints = REF_DIR / "constraints.txt"
    atomic_write_text(constraints, "".join(f"{n}=={v}\n" for n, v in wanted["pins"].items()))
    _run([str(python), "-m", "pip", "install", "-q", f"scib=={SCIB_VERSION}", "scanpy", "louvain", "igraph",
          "-c", str(constraints)], f"pip install scib=={SCIB_VERSION}")
    _run([str(python), "-c", f"import scib, louvain; assert scib.__version__ == {SCIB_VERSION!r}"], "import scib")
    atomic_write_text(marker, json.dumps(wanted, sort_keys=True))
    return python


def run_scib(h5ad: Path, label_key: str, batch_key: str | None, keys: list[str], tmp_path: Path) -> dict:
    python = reference_python()
    script, out = tmp_path / "scib_reference.py", tmp_path / "scib_reference.json"
    atomic_write_text(script, REFERENCE_SCRIPT)
    proc = subprocess.run([str(python), str(script), str(h5ad), label_key, batch_key or "", str(out), *keys],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def assert_same(ours: dict, ref: dict, with_batch: bool) -> None:
    assert ours["louvain_resolution"] == ref["louvain_resolution"]
    assert ours["nmi"] == pytest.approx(ref["nmi"], abs=1e-9)
    assert ours["nmi"] == pytest.approx(ref["opt_louvain_nmi"], abs=1e-9)
    assert ours["ari"] == pytest.approx(ref["ari"], abs=1e-9)
    assert ours["asw"] == pytest.approx(ref["asw"], abs=1e-9)
    ref_avgbio = (ref["nmi"] + ref["ari"] + ref["asw"]) / 3  # scGPT's avg_bio
    assert ours["avgbio"] == pytest.approx(ref_avgbio, abs=1e-9)
    if with_batch:
        assert ours["batch_asw"] == pytest.approx(ref["batch_asw"], abs=1e-9)


@pytest.mark.parametrize("name,label_key,batch_key", [("pbmc3k_clustifyr", "classified", None),
                                                      ("kang2018_pbmc_scgen", "cell_type", "condition")])
def test_metrics_equal_scib_1_1_5(shared_data, tmp_path, name, label_key, batch_key):
    adata = ad.read_h5ad(shared_data / f"{name}.h5ad")
    projection = np.random.default_rng(0).normal(size=(adata.n_vars, 32))
    adata.obsm["X_proj"] = np.asarray(adata.X @ projection, dtype=np.float32)
    started = time.perf_counter()
    ours = evaluate_embeddings(adata, label_key, ["X_proj"], baseline="pca", batch_key=batch_key)
    ours_s = time.perf_counter() - started
    # scib sees exactly the embeddings we scored, our PCA baseline included.
    h5ad = tmp_path / f"{name}_embeddings.h5ad"
    ad.AnnData(obs=adata.obs[[label_key] + ([batch_key] if batch_key else [])].copy(),
               obsm={"X_pca": adata.obsm["X_pca"], "X_proj": adata.obsm["X_proj"]}).write_h5ad(h5ad)
    started = time.perf_counter()
    ref = run_scib(h5ad, label_key, batch_key, ["X_pca", "X_proj"], tmp_path)
    ref_s = time.perf_counter() - started
    print(f"\n{name}: ours {ours_s:.1f} s, scib {ref['scib']} (scanpy {ref['scanpy']}) {ref_s:.1f} s incl. env check")
    for key in ("X_pca", "X_proj"):
        print(f"  {key}: ours {json.dumps({k: round(v, 6) for k, v in ours[key].items()})}")
        print(f"  {key}: scib {json.dumps({k: round(v, 6) for k, v in ref[key].items() if v == v})}")
        assert_same(ours[key], ref[key], with_batch=batch_key is not None)
