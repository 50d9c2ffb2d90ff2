"""AnnData files for every tool: one reader whose failures name the file, and a file's count matrix
(X, a layer, or `adata.raw` for `--layer raw`) together with the genes that index its columns.

Shard building (census.py), the vocabulary, zero-shot embedding and evaluation all read h5ad
files through `read_h5ad`, so a truncated file, a non-HDF5 file or a directory ends in one
ValueError naming the path (the CLIs print it as their `error:` line) instead of h5py's traceback.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

# `--layer raw`: adata.raw.X, whose columns are adata.raw.var (often more genes than adata.var,
# which a normalised X may have cut to highly variable genes).
RAW_LAYER = "raw"
# What h5py and anndata raise for a damaged file: a truncated or non-HDF5 file fails at open
# (OSError), a damaged object table when a member is read (KeyError, RuntimeError, OSError), and
# anndata's own checks on what it read (ValueError, TypeError). All of them mean "unreadable".
READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def check_h5ad_path(path: str | os.PathLike) -> None:
    """FileNotFoundError for a missing file, ValueError for a directory, both naming `path`."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"h5ad file not found: {path}")
    if not p.is_file():
        raise ValueError(f"{path}: is a directory, not an h5ad file" if p.is_dir() else f"{path}: not a file")


def read_h5ad(path: str | os.PathLike, backed: str | None = None):
    """anndata.read_h5ad; FileNotFoundError or ValueError naming `path` when it cannot be read."""
    import anndata

    check_h5ad_path(path)
    p = Path(path)
    try:
        return anndata.read_h5ad(p, backed=backed)
    except READ_ERRORS as e:
        raise ValueError(f"{path}: not a readable h5ad file ({type(e).__name__}: {e})") from None


def uses_raw(adata, layer: str | None) -> bool:
    """Whether `layer` means adata.raw: 'raw' when the file has no layer of that name (a layer
    called 'raw' keeps meaning that layer, as it did before adata.raw was readable)."""
    return layer == RAW_LAYER and layer not in adata.layers


def layer_var(adata, layer: str | None, path: str) -> pd.DataFrame:
    """The var table indexing the columns of `layer` (adata.raw.var for 'raw', else adata.var)."""
    if uses_raw(adata, layer):
        if adata.raw is None:
            raise ValueError(f"{path}: layer 'raw' not found; layers: {sorted(adata.layers.keys())}, "
                             f"and the file has no adata.raw")
        return adata.raw.var
    return adata.var


def layer_matrix(adata, layer: str | None, path: str):
    """X (layer None or ''), adata.layers[layer], or adata.raw.X for 'raw' (`uses_raw`), as stored."""
    if not layer:
        matrix = adata.X
    elif uses_raw(adata, layer):
        layer_var(adata, layer, path)  # the error when there is no adata.raw
        matrix = adata.raw.X
    elif layer in adata.layers:
        matrix = adata.layers[layer]
    else:
        raise ValueError(f"{path}: layer {layer!r} not found; layers: {sorted(adata.layers.keys())}"
                         f"{' and adata.raw (--layer raw)' if adata.raw is not None else ''}")
    if matrix is None:
        raise ValueError(f"{path}: X is empty; pass --layer (layers: {sorted(adata.layers.keys())})")
    return matrix


def raw_holds_counts(adata) -> bool:
    """adata.raw exists (and no layer 'raw' shadows it) and holds integer counts >= 0: the hint a
    non-integer X gives. `adata` is read into memory (not backed)."""
    import scipy.sparse as sp

    if not uses_raw(adata, RAW_LAYER) or adata.raw is None:
        return False
    matrix = adata.raw.X
    data = np.asarray(matrix.data if sp.issparse(matrix) else matrix)
    return bool(np.all(np.isfinite(data)) and np.all(data >= 0) and np.all(data == np.floor(data)))


__all__ = ["RAW_LAYER", "READ_ERRORS", "check_h5ad_path", "layer_matrix", "layer_var", "raw_holds_counts", "read_h5ad", "uses_raw"]
