"""Zero-shot embeddings: against a hand-built reference, independent of batch and neighbours,
rank-invariant on real counts, deterministic gene selection, pooling, encoders, clear errors.

Real objects throughout: CellJEPA + save_pretrained + a real GeneVocab, AnnData matrices."""
from __future__ import annotations

import importlib

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from celljepa_dist.data.binning import BINNING_RULE, bin_cell_reference
from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.model import CellJEPA, ModelConfig, make_teacher, save_pretrained
from celljepa_dist.model.pretrained import load_encoder
from celljepa_dist.zero_shot import EmbeddingConfig, embed, embed_anndata, select_genes
from celljepa_dist.zero_shot.cells import gene_priority, row_chunks, tokenize_rows
from celljepa_dist.zero_shot.embed import load_embedding_model
from celljepa_dist.zero_shot.genes import match_dataset_genes

N_VOCAB = 300
IDS = [f"ENSG{i:011d}" for i in range(N_VOCAB)]
SYMBOLS = [f"GENE{i}" for i in range(N_VOCAB)]
MAX_GENES = 50


def build_model(directory, feature_ids=IDS, feature_names=SYMBOLS, teacher=True, max_genes=MAX_GENES, seed=0):
    """A tiny real Cell-JEPA saved as users get it; the teacher differs from the student."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = GeneVocab.from_genes(feature_ids, feature_names)
    vocab.save(directory / "src_vocab.json")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(vocab), d_model=32, n_layers=2, n_heads=4, d_hid=64, dropout=0.2,
                      attention_backend="sdpa")
    model = CellJEPA(cfg)
    ema = None
    if teacher:
        ema = make_teacher(model.student)
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(0.05 * torch.randn_like(p))
    data = {"n_bins": 51, "max_genes": max_genes, "binning_rule": BINNING_RULE}
    return save_pretrained(model, directory / "model", vocab_path=directory / "src_vocab.json", teacher=ema, data=data)


def synthetic_counts(n_cells=40, seed=0, n_unknown=60):
    """Counts over 250 vocab genes (shuffled order) + genes the model never saw; cells from 5 to
    ~150 expressed vocab genes, so some exceed MAX_GENES."""
    rng = np.random.default_rng(seed)
    genes = list(rng.permutation(IDS[:250])) + [f"ENSG9{i:010d}" for i in range(n_unknown)]
    n_genes = len(genes)
    density = rng.uniform(0.02, 0.6, size=(n_cells, 1))
    x = (rng.random((n_cells, n_genes)) < density) * rng.poisson(3.0, size=(n_cells, n_genes))
    x[:, 0] += 1  # every cell expresses at least one vocab gene
    obs = pd.DataFrame({"cell_type": rng.choice(["a", "b", "c"], n_cells)}, index=[f"cell{i}" for i in range(n_cells)])
    return anndata.AnnData(sp.csr_matrix(x.astype(np.float32)), obs=obs, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("zs"))


@pytest.fixture(scope="module")
def counts():
    return synthetic_counts()


def reference_embedding(encoder, adata, row, max_genes, rule="random", pooling="cls"):
    """One cell by hand: naive per-cell binning, naive selection, a direct encoder call."""
    tokens = {g: 3 + i for i, g in enumerate(IDS)}
    x = np.asarray(adata.X[row].todense()).ravel()
    pairs = sorted((tokens[g], v) for g, v in zip(adata.var_names, x) if g in tokens and v > 0)
    tok = np.array([t for t, _ in pairs])
    vals = np.array([v for _, v in pairs], np.float32)
    bins = bin_cell_reference(vals, 51)  # over all matched genes, before selection
    if len(tok) > max_genes:
        if rule == "highest":
            chosen = sorted(range(len(tok)), key=lambda j: (-vals[j], tok[j]))[:max_genes]
        else:
            prio = gene_priority(tok)
            chosen = sorted(range(len(tok)), key=lambda j: prio[j])[:max_genes]
        keep = sorted(chosen)  # back to vocab order
        tok, bins = tok[keep], bins[keep]
    gene_ids = torch.tensor([[1] + tok.tolist()])
    values = torch.tensor([[0.0] + bins.astype(np.float32).tolist()])
    with torch.no_grad():
        hidden = encoder(gene_ids, values, torch.zeros_like(gene_ids, dtype=torch.bool), None)[0]
    emb = hidden[0] if pooling == "cls" else hidden[1:].mean(0)
    return torch.nn.functional.normalize(emb, dim=0).numpy()


@pytest.mark.parametrize("rule, pooling", [("random", "cls"), ("highest", "cls"), ("random", "mean")])
def test_matches_a_hand_built_reference(model_dir, counts, rule, pooling):
    emb = embed(model_dir, counts, max_genes=MAX_GENES, gene_selection=rule, pooling=pooling, verbose=False)
    teacher = load_encoder(model_dir, "teacher")
    lengths = np.asarray((counts.X[:, :250] > 0).sum(1)).ravel()
    rows = [int(np.argmin(lengths)), int(np.argmax(lengths)), 7]
    assert lengths[rows[1]] > MAX_GENES  # a capped cell is among them
    for row in rows:
        np.testing.assert_allclose(emb[row], reference_embedding(teacher, counts, row, MAX_GENES, rule, pooling),
                                   atol=1e-5, err_msg=f"cell {row}")


def test_independent_of_batch_size_and_neighbours(model_dir, counts):
    base = embed(model_dir, counts, batch_size=64, verbose=False)
    assert base.shape == (counts.n_obs, 32) and base.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, atol=1e-6)
    for batch_size in (1, 3):
        np.testing.assert_allclose(embed(model_dir, counts, batch_size=batch_size, verbose=False), base, atol=1e-5)
    perm = np.random.default_rng(1).permutation(counts.n_obs)
    shuffled = embed(model_dir, counts[perm].copy(), batch_size=3, verbose=False)
    np.testing.assert_allclose(shuffled, base[perm], atol=1e-5)  # row i of the output is input cell i
    # Distinct cells give distinct rows (no row copied from a neighbour, none left unfilled).
    assert len(np.unique(base.round(4), axis=0)) == counts.n_obs


def test_every_cell_is_embedded_across_chunks_and_partial_batches(model_dir, monkeypatch):
    adata = synthetic_counts(n_cells=23, seed=3)  # 23: not a multiple of the batch or chunk size
    whole = embed(model_dir, adata, batch_size=7, verbose=False, progress=False)
    assert whole.shape[0] == 23 and np.isfinite(whole).all()
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-6)
    # The module (the package attribute `embed` is the function of the same name).
    embed_module = importlib.import_module("celljepa_dist.zero_shot.embed")
    monkeypatch.setattr(embed_module, "CHUNK_CELLS", 5)  # 5 chunks, the last one of 3 cells
    np.testing.assert_allclose(embed(model_dir, adata, batch_size=2, verbose=False, progress=False), whole, atol=1e-5)


def test_long_cells_keep_a_deterministic_subset(model_dir, counts):
    enc = load_embedding_model(model_dir)
    match = match_dataset_genes(enc.vocab, counts.var)
    (_, indptr, indices, data), = row_chunks(counts.X, 10_000)
    cells = tokenize_rows(indptr, indices, data, match.tokens, 51)
    for rule in ("random", "highest"):
        kept = select_genes(cells, MAX_GENES, rule)
        np.testing.assert_array_equal(kept.lengths, np.minimum(cells.lengths, MAX_GENES))
        long = int(np.argmax(cells.lengths))
        # The same cell alone gives the same subset as inside the batch.
        alone = select_genes(cells.take(np.array([long])), MAX_GENES, rule)
        np.testing.assert_array_equal(alone.genes, kept.take(np.array([long])).genes)
    a = select_genes(cells.take(np.array([long])), MAX_GENES, "random").genes
    b = select_genes(cells.take(np.array([long])), MAX_GENES, "highest").genes
    assert not np.array_equal(a, b)
    top = select_genes(cells.take(np.array([long])), MAX_GENES, "highest")
    full = cells.take(np.array([long]))
    assert top.values.min() >= np.sort(full.values)[-MAX_GENES]  # the highest values are the ones kept
    # The same long cell at different rows, among other neighbours, embeds identically.
    other = synthetic_counts(n_cells=12, seed=5)
    mixed = anndata.concat([other[:5], counts[[long]], other[5:], counts[[long]]], index_unique="-")
    emb_mixed = embed(model_dir, mixed, batch_size=4, verbose=False)
    emb_base = embed(model_dir, counts, verbose=False)
    np.testing.assert_allclose(emb_mixed[5], emb_base[long], atol=1e-5)
    np.testing.assert_allclose(emb_mixed[-1], emb_base[long], atol=1e-5)


def test_teacher_student_and_default_encoder(tmp_path, model_dir, counts, capsys):
    teacher = embed(model_dir, counts, encoder="teacher", verbose=False)
    student = embed(model_dir, counts, encoder="student", verbose=False)
    auto = embed(model_dir, counts)
    assert "with the teacher encoder" in capsys.readouterr().out
    np.testing.assert_array_equal(auto, teacher)
    assert np.abs(teacher - student).max() > 1e-2
    solo = build_model(tmp_path / "solo", teacher=False)
    res = embed_anndata(solo, counts, EmbeddingConfig(progress=False))
    assert res.encoder == "student"
    with pytest.raises(ValueError, match="no EMA teacher.*--encoder student"):
        embed(solo, counts, encoder="teacher")


def test_pooling_options_are_unit_norm_and_differ(model_dir, counts):
    cls = embed(model_dir, counts, pooling="cls", verbose=False)
    mean = embed(model_dir, counts, pooling="mean", verbose=False)
    for e in (cls, mean):
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert np.abs(cls - mean).max() > 1e-2


def test_dense_sparse_layer_and_max_genes(model_dir, counts):
    base = embed(model_dir, counts, verbose=False)
    dense = anndata.AnnData(counts.X.toarray(), obs=counts.obs, var=counts.var)
    np.testing.assert_allclose(embed(model_dir, dense, verbose=False), base, atol=1e-6)
    csc = anndata.AnnData(sp.csc_matrix(counts.X), obs=counts.obs, var=counts.var)
    np.testing.assert_allclose(embed(model_dir, csc, verbose=False), base, atol=1e-6)
    layered = anndata.AnnData(np.zeros(counts.shape, np.float32), obs=counts.obs, var=counts.var,
                              layers={"counts": counts.X.copy()})
    np.testing.assert_allclose(embed(model_dir, layered, layer="counts", verbose=False), base, atol=1e-6)
    with pytest.raises(ValueError, match=r"layer 'raw' not found; layers: \['counts'\]"):
        embed(model_dir, layered, layer="raw")
    res = embed_anndata(model_dir, counts, EmbeddingConfig(max_genes=500, progress=False))
    assert res.max_genes == 500 and res.n_capped == 0
    assert embed_anndata(model_dir, counts, EmbeddingConfig(progress=False)).n_capped > 0
    assert np.abs(res.embeddings - base).max() > 1e-3  # capping changes long cells


def test_symbols_and_gene_key(model_dir, counts):
    base = embed(model_dir, counts, verbose=False)
    to_symbol = dict(zip(IDS, SYMBOLS))
    var = pd.DataFrame({"ensembl": list(counts.var_names)},
                       index=[to_symbol.get(g, f"LNC{i}") for i, g in enumerate(counts.var_names)])
    by_symbol = anndata.AnnData(counts.X, obs=counts.obs, var=var)
    np.testing.assert_array_equal(embed(model_dir, by_symbol, verbose=False), base)
    np.testing.assert_array_equal(embed(model_dir, by_symbol, gene_key="ensembl", verbose=False), base)


def test_bad_input_is_named(tmp_path, model_dir, counts):
    x = counts.X.toarray()
    x[4, 2] = -0.5
    bad = anndata.AnnData(sp.csr_matrix(x), obs=counts.obs, var=counts.var)
    with pytest.raises(ValueError, match=rf"cell 'cell4' \(row 4\), gene '{counts.var_names[2]}': value -0.5 is negative"):
        embed(model_dir, bad)
    x = counts.X.toarray()
    x[[3, 9], :250] = 0
    empty = anndata.AnnData(sp.csr_matrix(x), obs=counts.obs, var=counts.var)
    with pytest.raises(ValueError, match=r"2 of 40 cells have no expressed gene in the model's vocab: 'cell3', 'cell9'"):
        embed(model_dir, empty)
    with pytest.raises(ValueError, match="pooling 'max'"):
        embed(model_dir, counts, pooling="max")
    with pytest.raises(ValueError, match="gene selection 'top'"):
        embed(model_dir, counts, gene_selection="top")
    # A vocab.json that is not the one the model was trained with.
    other = build_model(tmp_path / "other", feature_ids=IDS[::-1], feature_names=SYMBOLS[::-1])
    (other / "vocab.json").write_bytes((model_dir / "vocab.json").read_bytes())
    with pytest.raises(ValueError, match="vocab content sha256 .* differs from the .*config.json vocab_sha256"):
        embed(other, counts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(model_dir, counts):
    with pytest.raises(ValueError, match="'cuda' requested but CUDA is not available"):
        embed(model_dir, counts, device="cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu(model_dir, counts):
    np.testing.assert_allclose(embed(model_dir, counts, device="cuda", verbose=False),
                               embed(model_dir, counts, verbose=False), atol=1e-4)


def test_rank_invariance_on_real_raw_counts(shared_data, tmp_path):
    """Raw counts and normalize_total + log1p of the same real cells: identical tokens, identical
    embeddings (per-cell quantile bins depend only on the ranks of the cell's values)."""
    import scanpy as sc

    path = shared_data / "baron2016_pancreas_came.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found")
    raw = anndata.read_h5ad(path)[:150].copy()
    assert np.array_equal(raw.X.data, np.round(raw.X.data))  # raw counts indeed
    # A vocab of Ensembl-like ids named by 2/3 of Baron's symbols plus genes Baron lacks.
    names = [g for i, g in enumerate(raw.var_names) if i % 3] + [f"NOTINBARON{i}" for i in range(2000)]
    model = build_model(tmp_path, feature_ids=[f"ENSG{i:011d}" for i in range(len(names))], feature_names=names,
                        max_genes=200)
    norm = raw.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    assert not np.array_equal(norm.X.data, np.round(norm.X.data))

    enc = load_embedding_model(model)
    match = match_dataset_genes(enc.vocab, raw.var)
    assert match.n_matched == len(names) - 2000
    (_, ip_r, ix_r, d_r), = row_chunks(raw.X, 10_000)
    (_, ip_n, ix_n, d_n), = row_chunks(norm.X, 10_000)
    a, b = tokenize_rows(ip_r, ix_r, d_r, match.tokens, 51), tokenize_rows(ip_n, ix_n, d_n, match.tokens, 51)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.genes, b.genes)
    np.testing.assert_array_equal(a.bins, b.bins)
    assert (a.lengths > 200).any()  # selection is exercised too
    for rule in ("random", "highest"):
        np.testing.assert_array_equal(select_genes(a, 200, rule).genes, select_genes(b, 200, rule).genes)
        e_raw = embed(model, raw, gene_selection=rule, verbose=False, progress=False)
        e_norm = embed(model, norm, gene_selection=rule, verbose=False, progress=False)
        np.testing.assert_array_equal(e_raw, e_norm)
