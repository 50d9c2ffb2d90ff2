"""Parameter counts per part of a model config.

    python -m celljepa_dist.model.summary --config configs/model/paper.yaml --vocab-size 60664
    python -m celljepa_dist.model.summary --config configs/model/paper.yaml --vocab vocab.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .cell_jepa import CellJEPA
from .config import ModelConfig
from .pretrained import load_vocab


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_table(cfg: ModelConfig) -> list[tuple[str, int]]:
    with torch.device("meta"):  # counts only: no memory, no init cost
        model = CellJEPA(cfg)
    enc = model.student
    rows = [
        ("gene embedding (table + LayerNorm)", count(enc.embed.gene)),
        ("value embedding", count(enc.embed.value)),
        (f"transformer blocks ({cfg.n_layers} x {count(enc.blocks[0]):,})", count(enc.blocks)),
    ]
    if enc.final_norm is not None:
        rows.append(("final LayerNorm (pre-norm)", count(enc.final_norm)))
    rows += [
        ("= encoder (student; the teacher is a copy)", count(enc)),
        ("  encoder without the gene table", count(enc) - enc.embed.gene.embedding.weight.numel()),
        ("GEP value head", count(model.value_head)),
        ("JEPA predictor", count(model.predictor)),
    ]
    if model.mvc_head is not None:
        rows.append(("GEPC/MVC head", count(model.mvc_head)))
    rows += [
        ("= CellJEPA trainable (student + heads)", count(model)),
        ("+ EMA teacher (fp32, not trained)", count(enc)),
    ]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--vocab-size", type=int)
    group.add_argument("--vocab", type=Path, help="vocab.json; its token count sets vocab_size")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_yaml(args.config)
    vocab_size = len(load_vocab(Path(args.vocab))) if args.vocab else args.vocab_size or cfg.vocab_size
    if vocab_size is None:
        parser.error(f"{args.config} has vocab_size: null; pass --vocab-size or --vocab")
    cfg = cfg.replace(vocab_size=vocab_size)
    print(f"{args.config}: {cfg.n_layers} blocks, d={cfg.d_model}, {cfg.n_heads} heads, FFN {cfg.d_hid}, "
          f"vocab {vocab_size:,}, {cfg.value_encoder} values, {cfg.norm_style}-norm")
    for name, n in parameter_table(cfg):
        print(f"  {name:<48} {n:>12,}  ({n / 1e6:6.2f}M)")


if __name__ == "__main__":
    main()
