"""Random batches in the collate format (docs/ARCHITECTURE.md) for tests and benchmarks; token ids
and sentinel values are the contract's (celljepa_dist/tokens.py), as in collated batches."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from celljepa_dist.tokens import CLS_ID, CLS_VALUE, MASK_VALUE, N_SPECIAL, PAD_ID, PAD_VALUE


def random_batch(lengths: Sequence[int], vocab_size: int, mask_ratio: float = 0.15, n_bins: int = 51,
                 seed: int = 0, fully_masked: Sequence[int] = (), unmasked: Sequence[int] = (),
                 labels: Optional[Sequence[int]] = None) -> dict[str, torch.Tensor]:
    """`lengths` counts tokens per cell including `<cls>`. Cells listed in `fully_masked` have every
    gene masked, those in `unmasked` none (the 100% and 0% edge cases)."""
    gen = torch.Generator().manual_seed(seed)
    lengths_t = torch.as_tensor(lengths, dtype=torch.int64)
    if (lengths_t < 1).any():
        raise ValueError(f"lengths must be >= 1 (the <cls> token), got {list(lengths)}")
    batch_size, max_len = len(lengths), int(lengths_t.max())
    padding_mask = torch.arange(max_len)[None, :] >= lengths_t[:, None]
    # Distinct genes per cell, as in real data.
    gene_ids = torch.stack([torch.randperm(vocab_size - N_SPECIAL, generator=gen)[:max_len] + N_SPECIAL
                            for _ in range(batch_size)])
    gene_ids[:, 0] = CLS_ID
    gene_ids[padding_mask] = PAD_ID
    target = torch.randint(1, n_bins, (batch_size, max_len), generator=gen).float()
    target[:, 0] = CLS_VALUE
    target[padding_mask] = PAD_VALUE
    genes = ~padding_mask
    genes[:, 0] = False
    value_mask = (torch.rand(batch_size, max_len, generator=gen) < mask_ratio) & genes
    for i in fully_masked:
        value_mask[i] = genes[i]
    for i in unmasked:
        value_mask[i] = False
    values = target.masked_fill(value_mask, MASK_VALUE)
    batch = {
        "gene_ids": gene_ids,
        "values": values,
        "target_values": target,
        "value_mask": value_mask,
        "padding_mask": padding_mask,
        "lengths": lengths_t.to(torch.int32),
        "cell_ids": torch.arange(batch_size, dtype=torch.int64),
    }
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels, dtype=torch.int64)
    return batch
