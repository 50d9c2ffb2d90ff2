"""The MLflow UI over a local tracking store: start and stop its server, and the URLs worth opening.

The server runs as `python -m mlflow server` of this interpreter in its own session (process
group), so Ctrl-C in the user's terminal reaches only the launcher, which then stops the whole
group (MLflow's server spawns uvicorn workers) and checks that nothing of it is left.

URLs follow MLflow 3.17's UI routes (hash router): an experiment's bare page opens on the GenAI
"Overview" (traces, latency), so links go to the runs tab with the "Model training" workflow
selected; the compare view takes JSON lists of run and experiment ids.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import quote

from celljepa_dist.launching import free_port
from celljepa_dist.tracking import sqlite_store_path, store_artifact_root

EVAL_PREFIXES = ("eval/", "health/")


def runs_view_url(base_url: str, experiment_id: str) -> str:
    """The experiment's training-runs table (not the GenAI overview its bare page shows)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def compare_runs_url(base_url: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """MLflow's compare view of these runs. The UI builds `?runs=["a","b"]&experiments=["1"]`
    (JSON.stringify) and parses it with `qs`, which also decodes the percent-encoded form used
    here, so the printed URL has no quotes or brackets that would end a terminal's link."""
    def as_json(ids: list[str]) -> str:
        return quote(json.dumps([str(i) for i in ids], separators=(",", ":")), safe="")

    return f"{base_url.rstrip('/')}/#/compare-runs?runs={as_json(run_ids)}&experiments={as_json(experiment_ids)}"


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """argv of the MLflow server for this store; for a local sqlite store, artifacts are served from
    `<store dir>/mlartifacts`, where the runs' recorded artifact_uri points."""
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    artifacts = store_artifact_root(tracking_uri)
    if artifacts is not None:
        argv += ["--default-artifact-root", artifacts, "--artifacts-destination", artifacts]
    return argv


def server_env() -> dict[str, str]:
    # The job runner (huey consumers for GenAI judges/trace jobs) is of no use for training runs
    # and would add processes and a /dev/shm queue per server.
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user reused the id: ours are gone
        return False
    return True


@dataclass
class UiServer:
    """A running MLflow UI server; `with start_server(...) as s:` stops it on exit."""
    process: subprocess.Popen
    host: str
    port: int
    tracking_uri: str
    log: IO[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pgid(self) -> int:
        return self.process.pid  # session leader (start_new_session): its pid is the group id

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, n_chars: int = 4000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-n_chars:]

    def wait(self) -> int:
        """Block until the server exits (returns its exit code); Ctrl-C raises KeyboardInterrupt here."""
        return self.process.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL whatever is left after `timeout_s`."""
        if _group_alive(self.pgid):
            os.killpg(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _group_alive(self.pgid) and time.monotonic() < deadline:
            self.process.poll()  # reap the leader so it does not linger as a zombie
            time.sleep(0.1)
        if _group_alive(self.pgid):
            os.killpg(self.pgid, signal.SIGKILL)
        self.process.wait()
        while _group_alive(self.pgid):  # SIGKILL is not instant for the group's other members
            time.sleep(0.05)
        self.log.close()

    def __enter__(self) -> UiServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_until_answering(server: UiServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _answers(f"{server.url}/health"):
        if not server.alive():
            raise RuntimeError(f"MLflow server on {server.tracking_uri} exited with code "
                               f"{server.process.returncode} before answering on port {server.port}:\n"
                               f"{server.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"MLflow server on {server.tracking_uri} did not answer {server.url}/health "
                               f"within {timeout_s:.0f} s:\n{server.log_tail()}")
        time.sleep(0.5)


def start_server(tracking_uri: str, port: int | None = None, host: str = "127.0.0.1",
                 timeout_s: float = 120.0) -> UiServer:
    """Start the MLflow UI on `tracking_uri` and return once it answers `/health`.

    `tracking_uri` should already be resolved (see tracking.resolve_store_uri): a sqlite file that
    does not exist is refused, since MLflow would create an empty store there."""
    db = sqlite_store_path(tracking_uri)
    if db is not None and not db.is_file():
        raise FileNotFoundError(f"MLflow store not found: {db} (from tracking URI {tracking_uri})")
    port = port or free_port()
    log = tempfile.TemporaryFile()  # the server's own output, shown only when it fails to start
    process = subprocess.Popen(server_command(tracking_uri, host, port), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=server_env(), start_new_session=True)
    server = UiServer(process=process, host=host, port=port, tracking_uri=tracking_uri, log=log)
    try:
        _wait_until_answering(server, timeout_s)
    except BaseException:  # a failed start or Ctrl-C while waiting leaves nothing running
        server.stop()
        raise
    return server


@dataclass
class ExperimentLinks:
    name: str
    experiment_id: str
    n_runs: int
    runs_url: str
    compare_url: str | None  # only once some runs carry evaluation metrics: then there is something to compare


def has_eval_metrics(metric_keys) -> bool:
    return any(k.startswith(EVAL_PREFIXES) for k in metric_keys)


def experiment_links(tracking_uri: str, base_url: str) -> list[ExperimentLinks]:
    """The links worth printing for each experiment of the store that has runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    links = []
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
        if not runs:
            continue
        judged = [r.info.run_id for r in runs if has_eval_metrics(r.data.metrics)]
        links.append(ExperimentLinks(
            name=exp.name, experiment_id=exp.experiment_id, n_runs=len(runs),
            runs_url=runs_view_url(base_url, exp.experiment_id),
            compare_url=compare_runs_url(base_url, judged, [exp.experiment_id]) if judged else None))
    return links
