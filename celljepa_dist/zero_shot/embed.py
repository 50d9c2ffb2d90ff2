"""Zero-shot cell embeddings: a save_pretrained model + cells -> one L2-normalised vector per cell.

    result = embed_anndata(model_dir, adata, EmbeddingConfig())     # EmbeddingResult
    result, obs = embed_shards(model_dir, shards_dir, EmbeddingConfig())

The forward is the teacher's unmasked one (cell_jepa.teacher_embedding): plain attention over
the non-pad tokens, eval mode, no grad, fp32. A cell's embedding depends on nothing but its own
tokens: cells are sorted by length inside each chunk (less padding) and put back in input order,
and padding never enters attention, so batch size and neighbours change nothing (to float
rounding; tests check 1e-5).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import pandas as pd
import torch

from celljepa_dist.data.binning import BINNING_RULE
from celljepa_dist.data.h5ad import layer_var
from celljepa_dist.data.vocab import GeneVocab

from .cells import (
    TokenizedCells,
    batch_arrays,
    check_gene_selection,
    check_no_empty_cells,
    expression_matrix,
    matched_genes_per_cell,
    row_chunks,
    select_genes,
    tokenize_rows,
)
from .genes import DEFAULT_MIN_VOCAB_FRACTION, GeneMatch, check_min_vocab_fraction, gene_labels, match_dataset_genes

ENCODERS = ("teacher", "student")
POOLINGS = ("cls", "mean")
DEFAULT_MAX_GENES = 600  # model dirs without a "data" section: the paper's L_max
CHUNK_CELLS = 4096  # cells tokenised and length-sorted together


@dataclass(frozen=True)
class EmbeddingConfig:
    encoder: Optional[str] = None  # None: the teacher if the model has one, else the student
    batch_size: int = 64
    device: str = "cpu"
    max_genes: Optional[int] = None  # None: the model's training max_genes
    gene_selection: str = "random"
    pooling: str = "cls"
    gene_key: Optional[str] = None  # var column with gene ids/symbols; None: var_names
    layer: Optional[str] = None  # AnnData layer instead of X
    min_vocab_fraction: float = DEFAULT_MIN_VOCAB_FRACTION
    attention_backend: str = "sdpa"  # any backend computes the same function; sdpa runs everywhere
    progress: bool = True

    def validate(self) -> "EmbeddingConfig":
        if self.encoder is not None and self.encoder not in ENCODERS:
            raise ValueError(f"encoder {self.encoder!r}: must be one of {ENCODERS} (or None for the default)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.max_genes is not None and (not isinstance(self.max_genes, int) or self.max_genes < 1):
            raise ValueError(f"max_genes must be a positive int or None, got {self.max_genes!r}")
        check_gene_selection(self.gene_selection)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: must be one of {POOLINGS}")
        check_min_vocab_fraction(self.min_vocab_fraction)
        resolve_device(self.device)
        return self


def resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: not a device name (use cpu or cuda)") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: must be cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


# --- the model -----------------------------------------------------------------------------------

@dataclass
class EmbeddingModel:
    encoder: torch.nn.Module  # a CellEncoder in eval mode on `device`
    which: str  # "teacher" or "student"
    vocab: GeneVocab
    n_bins: int
    max_genes: int  # the training cells' max_genes (the default cap)
    device: torch.device
    model_dir: Path


def load_model_vocab(model_dir: Path, meta: dict, vocab_size: int) -> GeneVocab:
    """vocab.json beside the weights, checked against config.json's vocab_sha256."""
    from celljepa_dist.model.pretrained import CONFIG_FILE, VOCAB_FILE

    path = model_dir / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the model has no vocab.json, so dataset genes cannot be matched to its "
                                f"tokens (save_pretrained(..., vocab_path=...) writes it)")
    vocab = GeneVocab.load(path)
    want = meta.get("vocab_sha256")
    if want != vocab.sha256:
        raise ValueError(f"{path}: vocab content sha256 {vocab.sha256[:12]}... differs from the "
                         f"{model_dir / CONFIG_FILE} vocab_sha256 {str(want)[:12]}...: not the vocab the model was "
                         f"trained with")
    if len(vocab) != vocab_size:
        raise ValueError(f"{path}: {len(vocab)} tokens but the model has vocab_size={vocab_size}")
    return vocab


def training_tokenisation(meta: dict, model_n_bins: int, where: str) -> tuple[int, int]:
    """(n_bins, max_genes) the model was trained with; old dirs without a data section: the
    model's n_bins and the paper's 600."""
    data = meta.get("data")
    if data is None:
        return model_n_bins, DEFAULT_MAX_GENES
    if data.get("binning_rule") != BINNING_RULE:
        raise ValueError(f"{where}: trained with binning rule {data.get('binning_rule')!r}; this version computes "
                         f"{BINNING_RULE!r}, so cells would not look as in training")
    return int(data["n_bins"]), int(data["max_genes"])


def choose_encoder(requested: Optional[str], has_teacher: bool, where: str) -> str:
    if requested is None:
        return "teacher" if has_teacher else "student"
    if requested == "teacher" and not has_teacher:
        raise ValueError(f"{where}: the model has no EMA teacher (has_teacher false); use --encoder student")
    return requested


def load_embedding_model(model_dir, encoder: Optional[str] = None, device: str = "cpu",
                         attention_backend: str = "sdpa") -> EmbeddingModel:
    from celljepa_dist.model.pretrained import load_config, load_encoder, load_meta

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    meta = load_meta(model_dir)
    cfg = load_config(model_dir)
    where = str(model_dir)
    vocab = load_model_vocab(model_dir, meta, cfg.require_vocab_size())
    n_bins, max_genes = training_tokenisation(meta, cfg.n_bins, where)
    which = choose_encoder(encoder, bool(meta.get("has_teacher")), where)
    dev = resolve_device(device)
    module = load_encoder(model_dir, which, attention_backend=attention_backend).eval().to(dev)
    return EmbeddingModel(module, which, vocab, n_bins, max_genes, dev, model_dir)


# --- the forward ---------------------------------------------------------------------------------

def pool(hidden: torch.Tensor, padding_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L, d] -> [B, d], L2-normalised: the `<cls>` output, or the mean over gene tokens
    (neither `<cls>` nor padding)."""
    if pooling == "cls":
        emb = hidden[:, 0]
    else:
        genes = ~padding_mask
        genes[:, 0] = False
        weights = genes.to(hidden.dtype).unsqueeze(-1)
        emb = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(emb.float(), dim=-1)


@torch.no_grad()
def embed_batch(model: EmbeddingModel, cells: TokenizedCells, pooling: str) -> np.ndarray:
    arrays = batch_arrays(cells)
    gene_ids = torch.from_numpy(arrays["gene_ids"]).to(model.device)
    values = torch.from_numpy(arrays["values"]).to(model.device)
    padding_mask = torch.from_numpy(arrays["padding_mask"]).to(model.device)
    hidden = model.encoder(gene_ids, values, padding_mask, None)
    return pool(hidden, padding_mask, pooling).cpu().numpy()


def embed_cells(model: EmbeddingModel, cells: TokenizedCells, batch_size: int, pooling: str,
                on_batch=None) -> np.ndarray:
    """Embeddings of already tokenised cells, in their order. Longest first (stable): batches of
    similar lengths pad little; every cell gets its row back."""
    out = np.empty((len(cells), model.encoder.cfg.d_model), dtype=np.float32)
    order = np.argsort(-cells.lengths, kind="stable")
    for start in range(0, len(cells), batch_size):
        rows = order[start:start + batch_size]
        out[rows] = embed_batch(model, cells.take(rows), pooling)
        if on_batch is not None:
            on_batch(len(rows))
    return out


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="cell", desc=desc, disable=not enabled or not sys.stderr.isatty())


def embed_chunks(model: EmbeddingModel, chunks: Iterable[TokenizedCells], n_cells: int, cfg: EmbeddingConfig,
                 max_genes: int) -> tuple[np.ndarray, int]:
    """Embed a stream of tokenised chunks (input order) -> ([n_cells, d], cells that were capped)."""
    out = np.empty((n_cells, model.encoder.cfg.d_model), dtype=np.float32)
    filled, capped = 0, 0
    with _progress(n_cells, cfg.progress, f"embed ({model.which})") as bar:
        for cells in chunks:
            capped += int((cells.lengths > max_genes).sum())
            cells = select_genes(cells, max_genes, cfg.gene_selection)
            out[filled:filled + len(cells)] = embed_cells(model, cells, cfg.batch_size, cfg.pooling, bar.update)
            filled += len(cells)
    if filled != n_cells:
        raise RuntimeError(f"embedded {filled} cells, expected {n_cells}")
    return out, capped


@dataclass
class EmbeddingResult:
    embeddings: np.ndarray  # float32 [n_cells, d], unit rows, input order
    encoder: str  # "teacher" or "student"
    pooling: str
    max_genes: int
    gene_selection: str
    n_capped: int  # cells with more matched expressed genes than max_genes
    genes: Optional[GeneMatch] = None  # h5ad/AnnData input only
    genes_per_cell: Optional[np.ndarray] = field(default=None, repr=False)  # matched expressed genes per cell

    def describe(self) -> str:
        lines = []
        if self.genes is not None:
            lines.append(self.genes.describe())
        if self.genes_per_cell is not None and len(self.genes_per_cell):
            g = self.genes_per_cell
            lines.append(f"matched expressed genes per cell: median {int(np.median(g))}, min {int(g.min())}, "
                         f"max {int(g.max())}")
        n, d = self.embeddings.shape
        lines.append(f"embedded {n:,} cells with the {self.encoder} encoder ({self.pooling} pooling, d={d}); "
                     f"{self.n_capped:,} cells had more than max_genes={self.max_genes} genes "
                     f"(kept by rule {self.gene_selection!r})")
        return "\n".join(lines)


def _max_genes(cfg: EmbeddingConfig, model: EmbeddingModel) -> int:
    return cfg.max_genes if cfg.max_genes is not None else model.max_genes


def embed_anndata(model_dir, adata, cfg: EmbeddingConfig = EmbeddingConfig(), where: str = "adata",
                  model: Optional[EmbeddingModel] = None) -> EmbeddingResult:
    """Every cell of `adata` (X or cfg.layer; raw counts or normalised) in input order."""
    cfg.validate()
    model = model or load_embedding_model(model_dir, cfg.encoder, cfg.device, cfg.attention_backend)
    var = layer_var(adata, cfg.layer, where)  # adata.raw.var for --layer raw: the genes of adata.raw.X
    match = match_dataset_genes(model.vocab, var, cfg.gene_key, cfg.min_vocab_fraction, where)
    labels, _ = gene_labels(var, cfg.gene_key, where)
    matrix = expression_matrix(adata, cfg.layer, where)
    if matrix.shape != (adata.n_obs, len(var)):
        raise ValueError(f"{where}: matrix shape {matrix.shape} differs from n_obs x n_vars = {adata.n_obs} x {len(var)}")
    obs_names = adata.obs_names
    per_cell = matched_genes_per_cell(matrix, match.tokens, obs_names, labels, where)
    check_no_empty_cells(per_cell, obs_names, where)

    def chunks() -> Iterator[TokenizedCells]:
        for _, indptr, indices, data in row_chunks(matrix, CHUNK_CELLS):
            yield tokenize_rows(indptr, indices, data, match.tokens, model.n_bins)

    max_genes = _max_genes(cfg, model)
    emb, capped = embed_chunks(model, chunks(), adata.n_obs, cfg, max_genes)
    return EmbeddingResult(emb, model.which, cfg.pooling, max_genes, cfg.gene_selection, capped, match, per_cell)


# --- shards --------------------------------------------------------------------------------------

def shard_obs(block, joinids: np.ndarray, label_names: Optional[list]) -> pd.DataFrame:
    """One row per shard cell: soma_joinid (also the index, as text), the meta columns, and the
    label's name when the manifest lists them."""
    obs = pd.DataFrame({"soma_joinid": np.asarray(joinids, np.int64)})
    for key, values in block.meta.items():
        obs[key] = list(values)
    if label_names is not None and "label" in obs.columns:
        names = np.asarray(list(label_names) + [""], dtype=object)
        obs["label_name"] = names[np.where(obs["label"].to_numpy() >= 0, obs["label"].to_numpy(), -1)]
    obs.index = pd.Index(obs["soma_joinid"].astype(str).to_numpy(), name=None)
    return obs


def _check_manifest(manifest: dict, model: EmbeddingModel, where: str) -> None:
    from celljepa_dist.data.shards import check_vocab_hash

    check_vocab_hash(manifest, model.vocab.sha256, where)
    binning = manifest["binning"]
    if binning.get("n_bins") != model.n_bins or binning.get("rule") != BINNING_RULE:
        raise ValueError(f"{where}: shards binned with {binning}, the model needs n_bins={model.n_bins}, "
                         f"rule {BINNING_RULE!r}")


def embed_shards(model_dir, shards_dir, cfg: EmbeddingConfig = EmbeddingConfig(),
                 model: Optional[EmbeddingModel] = None) -> tuple[EmbeddingResult, pd.DataFrame]:
    """Every cell of a shard set (bins as stored), in manifest order -> (result, obs)."""
    from celljepa_dist.data.shards import MANIFEST_NAME, read_manifest, read_shard

    cfg.validate()
    shards_dir = Path(shards_dir)
    where = str(shards_dir / MANIFEST_NAME)
    manifest = read_manifest(shards_dir)
    model = model or load_embedding_model(model_dir, cfg.encoder, cfg.device, cfg.attention_backend)
    _check_manifest(manifest, model, where)
    obs_parts: list[pd.DataFrame] = []
    per_cell_parts: list[np.ndarray] = []

    def chunks() -> Iterator[TokenizedCells]:
        for entry in manifest["shards"]:
            block = read_shard(shards_dir / entry["name"])
            if len(block) != entry["cells"]:
                raise ValueError(f"{shards_dir / entry['name']}: {len(block)} cells, the manifest says {entry['cells']}")
            obs = shard_obs(block, block.joinids, manifest.get("labels"))
            check_no_empty_cells(np.diff(block.offsets), [f"soma_joinid={j}" for j in block.joinids],
                                 str(shards_dir / entry["name"]))
            obs_parts.append(obs)
            per_cell_parts.append(np.diff(block.offsets))
            yield TokenizedCells.from_block(block)

    max_genes = _max_genes(cfg, model)
    emb, capped = embed_chunks(model, chunks(), int(manifest["total_cells"]), cfg, max_genes)
    obs = pd.concat(obs_parts) if obs_parts else pd.DataFrame({"soma_joinid": np.zeros(0, np.int64)})
    result = EmbeddingResult(emb, model.which, cfg.pooling, max_genes, cfg.gene_selection, capped, None,
                             np.concatenate(per_cell_parts) if per_cell_parts else np.zeros(0, np.int64))
    return result, obs


# --- the public function -------------------------------------------------------------------------

def embed(model_dir, adata, *, encoder: Optional[str] = None, gene_key: Optional[str] = None,
          layer: Optional[str] = None, batch_size: int = 64, device: str = "cpu", max_genes: Optional[int] = None,
          pooling: str = "cls", gene_selection: str = "random",
          min_vocab_fraction: float = DEFAULT_MIN_VOCAB_FRACTION, progress: bool = True,
          verbose: bool = True) -> np.ndarray:
    """L2-normalised embeddings [n_obs, d] (float32, input order) of every cell of `adata`.

    encoder None: the teacher if the model has one, else the student (printed when verbose)."""
    cfg = EmbeddingConfig(encoder=encoder, batch_size=batch_size, device=device, max_genes=max_genes,
                          gene_selection=gene_selection, pooling=pooling, gene_key=gene_key, layer=layer,
                          min_vocab_fraction=min_vocab_fraction, progress=progress)
    result = embed_anndata(model_dir, adata, cfg)
    if verbose:
        print(result.describe())
    return result.embeddings


def write_h5ad_atomic(adata, path) -> Path:
    """adata as an h5ad at `path`: written to a temp file beside it, then renamed."""
    from celljepa_dist.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return path
