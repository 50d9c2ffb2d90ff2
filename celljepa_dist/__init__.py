"""celljepa-dist: distributed pre-training of Cell-JEPA single-cell foundation models."""

__version__ = "0.1.0"


def embed(model_dir, adata, **kw):
    """Zero-shot cell embeddings [n_obs, d] of an AnnData (see celljepa_dist.zero_shot.embed).

    Imported on first call, so `import celljepa_dist` stays free of torch."""
    from celljepa_dist.zero_shot import embed as _embed

    return _embed(model_dir, adata, **kw)
