"""launch/evaluate.py end to end on real cells (a PBMC 3k subsample), with a real MLflow sqlite store."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from celljepa_dist.evaluation.metrics import nmi

pytestmark = pytest.mark.filterwarnings("ignore:pkg_resources is deprecated")
METRICS = {"nmi", "ari", "asw", "avgbio"}
REPO = Path(__file__).resolve().parents[1]


def _load_cli():
    """launch/ holds scripts, not a package: load evaluate.py by path and call its main() in-process
    (a subprocess per case would pay the imports and numba compilation again)."""
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_cli = _load_cli()


@pytest.fixture(scope="module")
def pbmc_h5ad(shared_data, tmp_path_factory):
    """Every 4th PBMC 3k cell (660, 9 types) with a seeded random projection of X as the 'model'."""
    adata = ad.read_h5ad(shared_data / "pbmc3k_clustifyr.h5ad")[::4].copy()
    projection = np.random.default_rng(0).normal(size=(adata.n_vars, 24))
    adata.obsm["X_proj"] = (adata.X @ projection).astype(np.float32)
    path = tmp_path_factory.mktemp("cli") / "pbmc_sub.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("eval-test", artifact_location=(root / "artifacts").as_uri())
    return uri, client.create_run(exp).info.run_id


@pytest.fixture(scope="module")
def cli_run(pbmc_h5ad, mlflow_run, tmp_path_factory):
    """One full CLI run (baseline + model + MLflow); the tests below read what it left."""
    uri, run_id = mlflow_run
    out = tmp_path_factory.mktemp("eval_out")
    argv = ["--h5ad", str(pbmc_h5ad), "--label-key", "classified", "--embedding-key", "X_proj",
            "--baseline", "pca", "--out", str(out), "--mlflow-run-id", run_id, "--tracking-uri", uri,
            "--dataset-name", "pbmc3k"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = evaluate_cli.main(argv)
    return rc, out, stdout.getvalue()


def test_cli_writes_metrics_json_md_and_png(cli_run):
    rc, out, stdout = cli_run
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["X_pca", "X_proj"]  # the baseline beside the model
    for scores in metrics.values():
        assert METRICS <= set(scores)
        assert all(0 <= scores[m] <= 1 for m in ("nmi", "asw", "avgbio")) and -1 <= scores["ari"] <= 1
        assert scores["avgbio"] == pytest.approx((scores["nmi"] + scores["ari"] + scores["asw"]) / 3)
        assert scores["n_cells"] == 660
    png = (out / "umap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out / "umap.png")
    assert image.shape[1] > 2 * image.shape[0]  # two panels side by side (+ legend)
    table = (out / "metrics.md").read_text()
    assert table in stdout or table.strip() in stdout
    assert "| `X_pca` |" in table and "| `X_proj` |" in table and "vs PCA" in table
    verdict = "beats PCA" if metrics["X_proj"]["avgbio"] > metrics["X_pca"]["avgbio"] else "loses to PCA"
    assert verdict in table.split("| `X_proj` |")[1].splitlines()[0]
    assert "used as is" in table  # PBMC 3k X is log-normalised: said so


def test_cli_metrics_are_the_nmi_of_a_real_clustering(cli_run, pbmc_h5ad):
    """Cheap independent check of the numbers: NMI is the best over a sweep, so it is at least the
    NMI of scanpy's Louvain at the chosen resolution recomputed here on the model embedding."""
    import scanpy as sc

    _, out, _ = cli_run
    metrics = json.loads((out / "metrics.json").read_text())["X_proj"]
    adata = ad.read_h5ad(pbmc_h5ad)
    sc.pp.neighbors(adata, use_rep="X_proj")
    sc.tl.louvain(adata, resolution=metrics["louvain_resolution"])
    assert nmi(adata.obs["classified"].to_numpy(), adata.obs["louvain"].astype(str).to_numpy()) == pytest.approx(
        metrics["nmi"], abs=1e-12)


def test_cli_logs_every_metric_and_artifacts_to_mlflow(cli_run, mlflow_run):
    from mlflow.tracking import MlflowClient

    _, out, _ = cli_run
    uri, run_id = mlflow_run
    client = MlflowClient(tracking_uri=uri)
    logged = client.get_run(run_id).data.metrics
    metrics = json.loads((out / "metrics.json").read_text())
    expected = {f"eval/pbmc3k/{key}/{name}": value for key, scores in metrics.items()
                for name, value in scores.items() if value is not None}
    assert set(logged) == set(expected)
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value, rel=1e-12)
    assert {"eval/pbmc3k/X_pca/avgbio", "eval/pbmc3k/X_proj/avgbio"} <= set(logged)
    artifacts = {a.path for a in client.list_artifacts(run_id, "eval/pbmc3k")}
    assert artifacts == {"eval/pbmc3k/metrics.md", "eval/pbmc3k/umap.png"}


def _run_cli(argv, capsys):
    rc = evaluate_cli.main(argv)
    return rc, capsys.readouterr()


def test_cli_missing_label_key_exits_2_listing_obs_columns(pbmc_h5ad, tmp_path, capsys):
    rc, cap = _run_cli(["--h5ad", str(pbmc_h5ad), "--label-key", "celltype", "--embedding-key", "X_proj",
                        "--out", str(tmp_path)], capsys)
    assert rc == 2
    assert cap.err.startswith("evaluate: error: label key 'celltype' not found in obs in ")
    assert str(pbmc_h5ad) in cap.err and "'classified'" in cap.err
    assert not (tmp_path / "metrics.json").exists()


def test_cli_missing_embedding_key_exits_2_listing_obsm_keys(pbmc_h5ad, tmp_path, capsys):
    rc, cap = _run_cli(["--h5ad", str(pbmc_h5ad), "--label-key", "classified", "--embedding-key", "X_scgpt",
                        "--out", str(tmp_path)], capsys)
    assert rc == 2 and "'X_scgpt' not found in obsm" in cap.err and "['X_proj']" in cap.err


def test_cli_bad_embeddings_and_labels_exit_2(pbmc_h5ad, tmp_path, capsys):
    adata = ad.read_h5ad(pbmc_h5ad)
    adata.obsm["X_nan"] = adata.obsm["X_proj"].copy()
    adata.obsm["X_nan"][:5, 0] = np.nan
    adata.obs["one_type"] = "T"
    adata.obs["holey"] = adata.obs["classified"].astype(object)
    adata.obs.loc[adata.obs_names[:3], "holey"] = np.nan
    bad = tmp_path / "bad.h5ad"
    adata.write_h5ad(bad)
    cases = [(["--label-key", "classified", "--embedding-key", "X_nan"], "'X_nan' in .*5 of 660 cells have NaN"),
             (["--label-key", "one_type", "--embedding-key", "X_proj"], "'one_type' .*single class"),
             (["--label-key", "holey", "--embedding-key", "X_proj"], "'holey' .*3 of 660 cells have a missing")]
    for extra, pattern in cases:
        rc, cap = _run_cli(["--h5ad", str(bad), "--out", str(tmp_path / "o"), *extra], capsys)
        assert rc == 2 and re.search(pattern, cap.err), (extra, cap.err)
        assert "bad.h5ad" in cap.err


def test_cli_mlflow_problems_exit_2_before_evaluating(pbmc_h5ad, mlflow_run, tmp_path, capsys, monkeypatch):
    uri, _ = mlflow_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = ["--h5ad", str(pbmc_h5ad), "--label-key", "classified", "--embedding-key", "X_proj", "--out", str(tmp_path)]
    rc, cap = _run_cli(base + ["--mlflow-run-id", "abc"], capsys)
    assert rc == 2 and "--tracking-uri" in cap.err and "MLFLOW_TRACKING_URI" in cap.err
    rc, cap = _run_cli(base + ["--mlflow-run-id", "0123456789abcdef", "--tracking-uri", uri], capsys)
    assert rc == 2 and "MLflow run '0123456789abcdef' not found" in cap.err
    rc, cap = _run_cli(base + ["--mlflow-run-id", "abc", "--tracking-uri", uri, "--dataset-name", "pbmc/v2"], capsys)
    assert rc == 2 and "dataset name 'pbmc/v2' cannot be part of the MLflow metric name" in cap.err
    assert not (tmp_path / "metrics.json").exists()


def test_cli_as_a_script_exits_2_on_a_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), "--h5ad", str(tmp_path / "no.h5ad"),
                           "--label-key", "x", "--embedding-key", "e", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert f"evaluate: error: h5ad file not found: {tmp_path / 'no.h5ad'}" in proc.stderr
