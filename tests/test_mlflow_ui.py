"""The MLflow UI server over a finished tiny run's store: REST answers, artefacts, clean stop, and
(slow) the runs table as headless Chromium renders it."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from mlflow.tracking import MlflowClient
from run_fixtures import REPO_ROOT, trained_tiny_runs

from celljepa_dist.config import TrackingConfig
from celljepa_dist.mlflow_ui import compare_runs_url, experiment_links, runs_view_url, server_command, start_server
from celljepa_dist.tracking import (
    DEMO_STORE,
    default_run_name,
    log_run_artifacts,
    make_tracker,
    resolve_store_uri,
    store_artifact_root,
)

CHROMIUM = "/usr/bin/chromium"
SERVER_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def tiny_runs(tiny_shards, tmp_path_factory):
    return trained_tiny_runs(tiny_shards, tmp_path_factory)


def _get_json(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _mlflow_ui_bundle() -> str:
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(p.read_text(errors="replace") for p in js.glob("main.*.js"))


# --- URLs against the installed MLflow UI's own routes ----------------------------------------------

def test_urls_follow_the_routes_of_the_installed_mlflow_ui():
    bundle = _mlflow_ui_bundle()
    # The runs tab route, the workflow switch read from the URL, and the compare page's query form.
    assert '"/experiments/:experimentId/runs"' in bundle
    assert re.search(r'\.get\("workflowType"\)', bundle) and 'MACHINE_LEARNING="machine_learning"' in bundle
    assert re.search(r"`\?runs=\$\{JSON\.stringify\(\w+\)\}&experiments=\$\{JSON\.stringify\(\w+\)\}`", bundle)
    assert '"/compare-runs"' in bundle

    assert runs_view_url("http://h:1/", "7") == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"
    url = compare_runs_url("http://h:1", ["a1", "b2"], ["7"])
    # What the UI itself builds (JSON.stringify), once percent-decoding is undone.
    assert unquote(url) == 'http://h:1/#/compare-runs?runs=["a1","b2"]&experiments=["7"]'
    query = parse_qs(urlsplit(urlsplit(url).fragment).query)
    assert json.loads(query["runs"][0]) == ["a1", "b2"] and json.loads(query["experiments"][0]) == ["7"]
    assert not set('"[] ,') & set(url)  # nothing that ends a link in a terminal


def test_default_run_name_says_objective_and_size():
    assert default_run_name("scgpt", 512, 12, "kidney") == "kidney (scgpt d512 L12)"
    assert default_run_name("celljepa", 64, 2, "tiny_celljepa") == "tiny_celljepa (d64 L2)"  # no repetition
    assert default_run_name("scgpt", 64, 2, "tiny_celljepa") == "tiny_celljepa (scgpt d64 L2)"


def test_log_final_and_artifacts_reach_the_run(tmp_path):
    tracker = make_tracker(TrackingConfig(experiment="t"), tmp_path / "runs" / "a", 0, {}, resume=False)
    tracker.log_final({"loss": 1.25, "loss_rec": 1.0})
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    log_run_artifacts(tracker.uri, tracker.run_id, [png])
    tracker.finish()
    client = MlflowClient(tracker.uri)
    assert client.get_run(tracker.run_id).data.metrics == {"final/loss": 1.25, "final/loss_rec": 1.0}
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "final/loss")] == [(0, 1.25)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["curve.png"]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        log_run_artifacts(tracker.uri, tracker.run_id, [tmp_path / "nope.png"])


def test_store_resolution_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="--tracking-uri"):
        resolve_store_uri(None)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing.db")):
        resolve_store_uri(f"sqlite:///{tmp_path / 'missing.db'}")
    demo = tmp_path / DEMO_STORE
    demo.parent.mkdir(parents=True)
    demo.touch()
    assert resolve_store_uri(None) == f"sqlite:///{demo}"
    other = tmp_path / "other.db"
    other.touch()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    assert resolve_store_uri(None) == f"sqlite:///{other}"
    assert resolve_store_uri("sqlite:///demo_out/runs/mlflow.db") == f"sqlite:///{demo}"  # made absolute
    assert resolve_store_uri("http://tracking:5000") == "http://tracking:5000"


def test_start_server_refuses_a_missing_store_and_the_cli_says_so(tmp_path, capsys):
    missing = tmp_path / "nope" / "mlflow.db"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        start_server(f"sqlite:///{missing}")
    assert not missing.exists()  # MLflow did not create an empty store there
    spec = importlib.util.spec_from_file_location("mlflow_ui_cli", REPO_ROOT / "launch" / "mlflow_ui.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--backend-store-uri", f"sqlite:///{missing}"]) == 2
    assert f"mlflow_ui: error: MLflow store not found: {missing}" in capsys.readouterr().err


# --- the server over the finished tiny runs ---------------------------------------------------------

def test_server_serves_both_runs_final_losses_and_artifacts_then_stops(tiny_runs):
    artifact_uris = {MlflowClient(tiny_runs.tracking_uri).get_run(r.run_id).info.artifact_uri
                     for r in tiny_runs.runs.values()}
    root = store_artifact_root(tiny_runs.tracking_uri)
    assert all(uri.startswith(root + "/") for uri in artifact_uris)  # what the server is told to serve
    assert server_command(tiny_runs.tracking_uri, "127.0.0.1", 1)[-4:] == [
        "--default-artifact-root", root, "--artifacts-destination", root]

    with start_server(tiny_runs.tracking_uri, timeout_s=SERVER_TIMEOUT_S) as server:
        api = f"{server.url}/api/2.0/mlflow"
        exp = _get_json(f"{api}/experiments/get-by-name?experiment_name={tiny_runs.experiment}")["experiment"]
        found = _get_json(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 10})["runs"]
        by_id = {r["info"]["run_id"]: r for r in found}
        assert set(by_id) == {r.run_id for r in tiny_runs.runs.values()}
        for run in tiny_runs.runs.values():
            served = by_id[run.run_id]
            assert served["info"]["run_name"] == run.run_name and served["info"]["status"] == "FINISHED"
            metrics = {m["key"]: m["value"] for m in served["data"]["metrics"]}
            for term, value in run.last_losses.items():  # from losses.jsonl, written by the run itself
                assert metrics[f"final/{term}"] == pytest.approx(value, rel=1e-12)
                assert metrics[term] == pytest.approx(value, rel=1e-12)
            assert ("final/loss_jepa" in metrics) == (run.objective == "celljepa")
            with urllib.request.urlopen(f"{server.url}/get-artifact?path=loss_curves.png&run_uuid={run.run_id}",
                                        timeout=30) as r:
                assert r.read() == (run.run_dir / "loss_curves.png").read_bytes()
        pgid = server.pgid
        assert not _group_gone(pgid)
    assert server.process.poll() is not None
    assert _group_gone(pgid)  # the server and every worker it started


def _processes_with(arg: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if arg.encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_cli_prints_the_runs_view_and_ctrl_c_stops_everything(tiny_runs):
    cli = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch" / "mlflow_ui.py"),
                            "--backend-store-uri", tiny_runs.tracking_uri, "--timeout", str(SERVER_TIMEOUT_S)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    lines = []
    try:
        for line in cli.stdout:  # bounded by pytest's timeout; the CLI exits on a failed start
            lines.append(line)
            if line.startswith("Ctrl-C to stop"):
                break
        text = "".join(lines)
        base = re.search(r"MLflow UI: (http://127\.0\.0\.1:(\d+))", text)
        assert base, text
        exp_id = MlflowClient(tiny_runs.tracking_uri).get_experiment_by_name(tiny_runs.experiment).experiment_id
        assert f"{tiny_runs.experiment} (2 runs): {runs_view_url(base.group(1), exp_id)}" in text
        port = base.group(2)
        assert _processes_with(port), "no server process found listening on the printed port"
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
    assert _processes_with(port) == []


# --- the runs table in a real browser -----------------------------------------------------------------

def _chromium(*args: str, user_data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={user_data_dir}", "--virtual-time-budget=20000",
                           *args], capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_runs_table_renders_in_headless_chromium(tiny_runs, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install -y chromium)")
    names = [r.run_name for r in tiny_runs.runs.values()]
    with start_server(tiny_runs.tracking_uri, timeout_s=SERVER_TIMEOUT_S) as server:
        client = MlflowClient(tiny_runs.tracking_uri)
        exp_id = client.get_experiment_by_name(tiny_runs.experiment).experiment_id
        url = runs_view_url(server.url, exp_id)
        dom = _chromium("--dump-dom", url, user_data_dir=tmp_path / "profile").stdout
        for name in names:
            assert f">{name}<" in dom, f"run {name!r} not in the rendered runs table of {url}"
        assert "No data available for the selected time range" not in dom  # the GenAI overview's text
        png = tmp_path / "mlflow_runs.png"
        _chromium(f"--screenshot={png}", "--window-size=1400,900", url, user_data_dir=tmp_path / "profile2")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        if (REPO_ROOT / "demo_out").is_dir():
            shutil.copyfile(png, REPO_ROOT / "demo_out" / "mlflow_runs.png")

        # The compare view of the same runs shows both of them.
        links = {e.name: e for e in experiment_links(tiny_runs.tracking_uri, server.url)}
        compare = compare_runs_url(server.url, [r.run_id for r in tiny_runs.runs.values()], [exp_id])
        assert links[tiny_runs.experiment].runs_url == url
        dom = _chromium("--dump-dom", compare, user_data_dir=tmp_path / "profile3").stdout
        assert "Comparing 2 Runs" in dom and all(name in dom for name in names)
