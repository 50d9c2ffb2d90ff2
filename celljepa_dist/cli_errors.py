"""How the training launchers (pretrain, finetune, perturb) end on an error the user can act on:
one line `PROG: error: ...` and exit status 2, as the data tools do, instead of a traceback.

User errors are the ones whose message names what to fix: bad config or input (ValueError and its
subclasses: ConfigError, ShardError, ExportError, ...), a missing file, a refused resume, a run
directory held by another job, a failed checkpoint save, a non-finite loss, a silent rank.
Anything else is a bug and keeps its traceback; `CELLJEPA_TRACEBACK=1` shows it for all."""
from __future__ import annotations

import os
import sys
from typing import Callable


def user_error_types() -> tuple[type[BaseException], ...]:
    from celljepa_dist.train.checkpoint import CheckpointSaveError, ResumeError
    from celljepa_dist.train.collectives import CollectiveTimeout
    from celljepa_dist.train.loop import NonFiniteError
    from celljepa_dist.train.run_lock import RunDirBusy

    return (ValueError, FileNotFoundError, ResumeError, RunDirBusy, CheckpointSaveError, NonFiniteError,
            CollectiveTimeout)


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """`main()`, with a user error turned into `PROG: error: message` on stderr and status 2."""
    try:
        return main()
    except Exception as e:
        if os.environ.get("CELLJEPA_TRACEBACK") == "1" or not isinstance(e, user_error_types()):
            raise
        message = str(e)
        # Messages that already carry the tool's "error:" prefix (the run-dir lock's) are not doubled.
        message = message[len("error: "):] if message.startswith("error: ") else message
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2
