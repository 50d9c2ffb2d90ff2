"""Export a committed checkpoint to a `from_pretrained` directory (student + heads, EMA teacher,
vocab, config), offline: any ZeRO stage, any world size, no DeepSpeed ranks launched.

    python launch/export.py --checkpoint RUN_DIR/checkpoints/step_00000100 --out my_model
    python launch/export.py --checkpoint RUN_DIR --out my_model     # the run's newest commit
Then: celljepa_dist.model.from_pretrained("my_model"), or launch/embed.py --model my_model.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def resolve_checkpoint(path: Path) -> Path:
    """A step directory as given, or a run directory's newest committed checkpoint."""
    from celljepa_dist.train.checkpoint import committed_checkpoints

    if (path / "checkpoints").is_dir():
        found = committed_checkpoints(path / "checkpoints")
        if not found:
            raise ValueError(f"{path}: no committed checkpoint under {path / 'checkpoints'}")
        return found[-1]
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a committed checkpoint dir (step_N) or a run dir")
    p.add_argument("--out", required=True, help="output directory (save_pretrained format)")
    p.add_argument("--vocab", default=None, help="vocab.json (default: the run's own, checked by hash)")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading DeepSpeed's files needs no accelerator
    from celljepa_dist.export import export_checkpoint

    try:
        ckpt = resolve_checkpoint(Path(args.checkpoint))
        res = export_checkpoint(ckpt, args.out, args.vocab)
    except (ValueError, FileNotFoundError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} (step {res.step}, ZeRO-{res.zero_stage}, world size {res.world_size}, "
          f"teacher: {'yes' if res.has_teacher else 'no'}, student: {res.student_weights}) -> {res.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
