"""The MLflow UI over the runs' tracking store, opened on the training-runs table.

    python launch/mlflow_ui.py                          # the demo store (demo_out/runs/mlflow.db), a free port
    python launch/mlflow_ui.py --backend-store-uri sqlite:///RUNS/mlflow.db --port 5000
Prints the URL of each experiment's runs view (and its compare view once runs carry eval/ metrics),
then serves until Ctrl-C, which stops the server and everything it started.
"""
from __future__ import annotations

import argparse
import signal
import sys

from celljepa_dist.mlflow_ui import experiment_links, start_server
from celljepa_dist.tracking import resolve_store_uri


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend-store-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else demo_out/runs/mlflow.db)")
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")
    args = p.parse_args(argv)
    try:
        uri = resolve_store_uri(args.backend_store_uri)
    except (ValueError, FileNotFoundError) as e:
        print(f"mlflow_ui: error: {e}", file=sys.stderr)
        return 2
    # Ctrl-C, and a plain `kill`, stop the server too (it runs in its own session, so neither reaches
    # it directly); SIGINT is set explicitly since a shell starting us in the background ignores it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"starting the MLflow UI on {uri} ...", flush=True)
    try:
        server = start_server(uri, port=args.port, host=args.host, timeout_s=args.timeout)
    except (RuntimeError, TimeoutError) as e:
        print(f"mlflow_ui: error: {e}", file=sys.stderr)
        return 1
    with server:
        print(f"MLflow UI: {server.url}")
        links = experiment_links(uri, server.url)
        for exp in links:
            print(f"  {exp.name} ({exp.n_runs} runs): {exp.runs_url}")
            if exp.compare_url:
                print(f"    compare the evaluated runs: {exp.compare_url}")
        if not links:
            print("  (no runs in this store yet)")
        print("Ctrl-C to stop.", flush=True)
        try:
            code = server.wait()
        except KeyboardInterrupt:
            print("\nstopping the MLflow UI ...", flush=True)
            return 0
        print(f"mlflow_ui: error: the MLflow server exited with code {code}:\n{server.log_tail()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
