"""Comparing runs: the tiny celljepa and scgpt runs (real MLflow store) with evaluation metrics logged
to them, checked against losses.jsonl and MlflowClient; the pure parts on hand-built cases."""
from __future__ import annotations

import importlib.util
import json
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.tracking import MlflowClient
from run_fixtures import REPO_ROOT, trained_tiny_runs

from celljepa_dist.compare import (
    Comparison,
    RunSummary,
    compare_runs,
    compare_url,
    eval_sort_key,
    render_markdown,
    write_comparison,
)

# Hand-picked evaluation values, logged as the evaluator would (eval/{dataset}/{embedding}/{metric}).
EVAL = {"celljepa": {"eval/tiny/X_celljepa/avgbio": 0.61, "eval/tiny/X_pca/avgbio": 0.52,
                     "eval/tiny/X_celljepa/nmi": 0.70, "health/tiny/X_celljepa/effective_rank": 12.5},
        "scgpt": {"eval/tiny/X_scgpt/avgbio": 0.57, "eval/tiny/X_pca/avgbio": 0.52}}


def _load_cli():
    spec = importlib.util.spec_from_file_location("compare_runs_cli", REPO_ROOT / "launch" / "compare_runs.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


@pytest.fixture(scope="module")
def judged_runs(tiny_shards, tmp_path_factory):
    runs = trained_tiny_runs(tiny_shards, tmp_path_factory)
    client = MlflowClient(runs.tracking_uri)
    for objective, metrics in EVAL.items():
        for key, value in metrics.items():
            client.log_metric(runs.runs[objective].run_id, key, value)
    return runs


def _table(markdown: str, section: str) -> dict[str, list[str]]:
    """First column -> the other cells, of each row (header first) of the table under `## section`."""
    body = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| ")]
    return {cells[0].strip(" `"): [c.strip() for c in cells[1:]] for cells in rows}  # header row included


# --- pure parts on hand-built runs --------------------------------------------------------------------

def _summary(run_id, params, losses=None, evals=None):
    return RunSummary(run_id=run_id, name=run_id, status="FINISHED", params=params, tags={},
                      loss_history=losses or {}, eval_metrics=evals or {})


def test_differing_params_include_a_param_only_one_run_has():
    c = Comparison("sqlite:///x", "e", "1", [_summary("a", {"lr": "1", "seed": "0", "only_a": "x"}),
                                             _summary("b", {"lr": "2", "seed": "0"})])
    assert c.differing_params() == {"lr": ["1", "2"], "only_a": ["x", None]}
    assert c.equal_param_count() == 1
    md = render_markdown(c)
    assert _table(md, "Parameters that differ") == {"parameter": ["a (`a`)", "b (`b`)"],
                                                    "lr": ["1", "2"], "only_a": ["x", "—"]}
    assert "2 differ, 1 are equal in all runs." in md


def test_final_loss_is_the_last_step_and_terms_are_ordered_total_first():
    run = _summary("a", {}, losses={"loss_rec": [(1, 3.0), (2, 2.0)], "loss": [(1, 5.0), (2, 4.0), (3, 3.5)]})
    c = Comparison("sqlite:///x", "e", "1", [run, _summary("b", {}, losses={"loss": [(1, 6.0)]})])
    assert run.final_loss("loss") == (3, 3.5) and run.final_loss("loss_jepa") is None
    assert c.loss_terms() == ["loss", "loss_rec"]
    assert _table(render_markdown(c), "Final losses")["loss_rec"] == ["2 (step 2)", "—"]


def test_baseline_rows_sit_beside_the_model_rows_of_the_same_metric():
    keys = ["eval/pbmc/X_pca/nmi", "eval/pbmc/X_celljepa/avgbio", "eval/pbmc/X_pca/avgbio",
            "health/pbmc/X_celljepa/rank", "eval/kang/X_celljepa/avgbio"]
    assert sorted(keys, key=eval_sort_key) == [
        "eval/kang/X_celljepa/avgbio", "eval/pbmc/X_celljepa/avgbio", "eval/pbmc/X_pca/avgbio",
        "eval/pbmc/X_pca/nmi", "health/pbmc/X_celljepa/rank"]


# --- the tiny runs ------------------------------------------------------------------------------------

def test_comparison_of_the_tiny_runs(judged_runs, tmp_path):
    runs = judged_runs.runs
    c = compare_runs(judged_runs.tracking_uri, judged_runs.experiment)
    assert c.run_ids == [runs["celljepa"].run_id, runs["scgpt"].run_id]  # oldest first

    # Parameters: an independent count over MlflowClient's params of both runs.
    client = MlflowClient(judged_runs.tracking_uri)
    p1, p2 = (client.get_run(r.run_id).data.params for r in runs.values())
    differing = {k for k in p1.keys() | p2.keys() if p1.get(k) != p2.get(k)}
    assert set(c.differing_params()) == differing and {"objective", "run_dir"} <= differing
    assert c.equal_param_count() == len(p1.keys() | p2.keys()) - len(differing) > 50

    # Final losses: the last record of each run's own losses.jsonl.
    for summary, run in zip(c.runs, runs.values()):
        for term, value in run.last_losses.items():
            assert summary.final_loss(term) == (run.losses[-1]["step"], pytest.approx(value, rel=1e-12))
        assert summary.eval_metrics == pytest.approx(EVAL[run.objective])

    paths = write_comparison(c, tmp_path / "cmp")
    md = paths["markdown"].read_text()
    assert md == render_markdown(c)
    params = _table(md, "Parameters that differ")
    assert params["objective"] == ["celljepa", "scgpt"]
    losses = _table(md, "Final losses")
    for col, run in enumerate(runs.values()):
        for term in ("loss", "loss_rec"):
            value, step = losses[term][col].removesuffix(")").split(" (step ")
            assert int(step) == run.losses[-1]["step"]
            assert float(value) == pytest.approx(run.losses[-1][term], rel=5e-4)  # 4 significant digits
    assert losses["loss_jepa"][1] == "—"  # scgpt has no JEPA term

    evals = _table(md, "Evaluation metrics")
    assert evals["eval/tiny/X_pca/avgbio"] == ["0.52", "0.52"]
    assert evals["eval/tiny/X_celljepa/avgbio"] == ["0.61", "—"]
    assert evals["eval/tiny/X_scgpt/avgbio"] == ["—", "0.57"]
    assert evals["health/tiny/X_celljepa/effective_rank"] == ["12.5", "—"]
    rows = list(evals)[1:]
    assert rows.index("eval/tiny/X_pca/avgbio") - rows.index("eval/tiny/X_celljepa/avgbio") == 1

    png = paths["loss_curves"]
    assert png == tmp_path / "cmp" / "loss_curves.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size[0] > 2.5 * Image.open(png).size[1]  # three panels side by side
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["comparison.md", "loss_curves.png"]


def test_cli_prints_the_markdown_and_the_mlflow_compare_url(judged_runs, tmp_path, capsys):
    runs = judged_runs.runs
    ids = [runs["scgpt"].run_id, runs["celljepa"].run_id]
    cli = _load_cli()
    assert cli.main(["--tracking-uri", judged_runs.tracking_uri, "--experiment", judged_runs.experiment,
                     "--runs", *ids, "--out", str(tmp_path / "o"), "--ui-url", "http://127.0.0.1:5055"]) == 0
    out = capsys.readouterr().out
    assert out.startswith((tmp_path / "o" / "comparison.md").read_text())
    url = out.split("MLflow compare view: ")[1].strip()
    exp_id = MlflowClient(judged_runs.tracking_uri).get_experiment_by_name(judged_runs.experiment).experiment_id
    fragment = urlsplit(url).fragment
    assert url.startswith("http://127.0.0.1:5055/#/compare-runs?") and fragment.startswith("/compare-runs?")
    query = parse_qs(urlsplit(fragment).query)
    assert json.loads(query["runs"][0]) == ids and json.loads(query["experiments"][0]) == [exp_id]
    same = compare_runs(judged_runs.tracking_uri, judged_runs.experiment, ids)
    assert url == compare_url("http://127.0.0.1:5055", same)


def test_cli_errors_name_what_is_wrong(judged_runs, tmp_path, capsys, monkeypatch):
    cli = _load_cli()
    uri, out = judged_runs.tracking_uri, str(tmp_path / "o")
    client = MlflowClient(uri)
    empty = "no-runs-here"
    if client.get_experiment_by_name(empty) is None:
        client.create_experiment(empty)
    other_exp = client.get_experiment_by_name("other") or client.get_experiment(client.create_experiment("other"))
    stray = client.create_run(other_exp.experiment_id).info.run_id
    cases = [
        (["--experiment", "nope"], f"experiment 'nope' not found in {uri}; existing experiments: "),
        (["--experiment", judged_runs.experiment, "--runs", "deadbeef"], f"run 'deadbeef' not found in {uri}"),
        (["--experiment", judged_runs.experiment, "--runs", stray], f"run '{stray}' belongs to experiment id"),
        (["--experiment", empty], f"experiment '{empty}' (id "),
    ]
    for args, message in cases:
        assert cli.main(["--tracking-uri", uri, *args, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"compare_runs: error: {message}"), err
    assert "celljepa-demo" in _experiments_listed(cli, uri, out, capsys)
    missing = tmp_path / "none.db"
    assert cli.main(["--tracking-uri", f"sqlite:///{missing}", "--experiment", "x", "--out", out]) == 2
    assert f"MLflow store not found: {missing}" in capsys.readouterr().err and not missing.exists()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--experiment", "x", "--out", out]) == 2
    assert "--tracking-uri" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def _experiments_listed(cli, uri, out, capsys) -> str:
    cli.main(["--tracking-uri", uri, "--experiment", "nope", "--out", out])
    return capsys.readouterr().err.split("existing experiments: ")[1]
