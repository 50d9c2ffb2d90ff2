"""Gene-id schemes of AnnData files: detect Ensembl ids vs symbols, convert with a map, take the union.

Several h5ad files go into one vocabulary only when their genes are keyed the same way, so the
scheme (`ensembl` or `symbol`) is chosen for the whole set: given explicitly, or `auto`, which
takes the scheme every file was detected as and refuses a set whose files disagree. A file whose
ids are in the other scheme is used through its own second column (e.g. 10x-style var: Ensembl
`gene_ids` column, symbols in var_names) or converted with a gene map; otherwise it is an error
naming the file and what was detected.

Union order: genes in order of first appearance, over the files in the order given, each file in
its var order. Ensembl ids are compared without their version (ENSG...1.5 == ENSG...1.6); the
first spelling seen is kept.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

SCHEMES = ("ensembl", "symbol")
REQUESTABLE_SCHEMES = ("auto", *SCHEMES)
# ENSG00000141510, ENSMUSG00000000001, optionally versioned (.15); Census and GENCODE spellings.
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
# A file is one scheme when at least this fraction of its ids says so: spike-ins (ERCC-00002)
# among Ensembl ids, or a few genes named by their Ensembl id among symbols, are normal. Anything
# in between is refused as ambiguous rather than guessed.
SCHEME_MAJORITY = 0.9
VAR_NAMES = "var_names"  # --gene-key value meaning the AnnData index
ID_COLUMNS = ("feature_id", "gene_ids", "gene_id", "ensembl_id")
NAME_COLUMNS = ("feature_name", "gene_name", "gene_symbols", "gene_symbol")
GENE_MAP_HEADER = ("feature_id", "feature_name")


def looks_ensembl(gene_id: str) -> bool:
    return ENSEMBL_ID.match(gene_id) is not None


def union_key(gene_id: str) -> str:
    """The identity of a gene across files: Ensembl ids without their version, anything else as is."""
    return gene_id.split(".", 1)[0] if looks_ensembl(gene_id) else gene_id


@dataclass(frozen=True)
class Detection:
    n_ensembl: int
    n_ids: int

    @property
    def scheme(self) -> str | None:
        """'ensembl', 'symbol', or None when neither holds a SCHEME_MAJORITY of the ids."""
        if self.n_ids and self.n_ensembl >= SCHEME_MAJORITY * self.n_ids:
            return "ensembl"
        if self.n_ids and self.n_ids - self.n_ensembl >= SCHEME_MAJORITY * self.n_ids:
            return "symbol"
        return None

    def __str__(self) -> str:
        return f"{self.scheme or 'ambiguous'} ({self.n_ensembl} of {self.n_ids} ids look like Ensembl ids)"


def detect_scheme(ids: Sequence[str]) -> Detection:
    return Detection(sum(looks_ensembl(i) for i in ids), len(ids))


@dataclass(frozen=True)
class GeneMap:
    """Ensembl id <-> symbol pairs from a TSV: header `feature_id<TAB>feature_name`, then one pair
    per line. A symbol listed with several ids is ambiguous and never converted to an id."""
    path: str
    feature_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    sha256: str

    @classmethod
    def load(cls, path: str | Path) -> "GeneMap":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"gene map not found: {path}")
        raw = path.read_bytes()
        lines = raw.decode("utf-8").splitlines()
        if not lines or tuple(lines[0].rstrip("\r").split("\t")) != GENE_MAP_HEADER:
            raise ValueError(f"gene map {path}: line 1 must be the header 'feature_id<TAB>feature_name', "
                             f"got {lines[0][:80] if lines else ''!r}")
        ids, names, line_of = [], [], {}
        for n, line in enumerate(lines[1:], start=2):
            fields = line.rstrip("\r").split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise ValueError(f"gene map {path}: line {n} must be two non-empty tab-separated fields, got {line!r}")
            fid, name = fields[0].strip(), fields[1].strip()
            key = union_key(fid)
            if key in line_of:
                raise ValueError(f"gene map {path}: feature_id {fid!r} on lines {line_of[key]} and {n}")
            line_of[key] = n
            ids.append(fid)
            names.append(name)
        return cls(str(path), tuple(ids), tuple(names), hashlib.sha256(raw).hexdigest())

    def __post_init__(self):
        name_count: dict[str, int] = {}
        for name in self.feature_names:
            name_count[name] = name_count.get(name, 0) + 1
        object.__setattr__(self, "_name_of", {union_key(f): n for f, n in zip(self.feature_ids, self.feature_names)})
        object.__setattr__(self, "_id_of", {n: f for f, n in zip(self.feature_ids, self.feature_names)
                                            if name_count[n] == 1})

    def symbol_of(self, ensembl_id: str) -> str | None:
        return self._name_of.get(union_key(ensembl_id))

    def ensembl_of(self, symbol: str) -> str | None:
        return self._id_of.get(symbol)

    def describe(self) -> dict:
        return {"path": Path(self.path).name, "pairs": len(self.feature_ids), "sha256": self.sha256}


@dataclass(frozen=True)
class FileGenes:
    """The gene columns one file offers: the key column and, when there is a different one, names."""
    where: str
    key_source: str  # "var_names" or "var['COLUMN']"
    keys: tuple[str, ...]
    names_source: str | None
    names: tuple[str, ...] | None
    key_given: bool  # the key column was chosen with --gene-key: never fall back to the names


def _column(var: pd.DataFrame, column: str) -> tuple[str, tuple[str, ...]]:
    if column == VAR_NAMES:
        return VAR_NAMES, tuple(str(x) for x in var.index)
    return f"var[{column!r}]", tuple(var[column].astype(str).tolist())


def file_genes(var: pd.DataFrame, gene_key: str | None, where: str) -> FileGenes:
    """The key column is `gene_key` (a var column or 'var_names'), else the first of ID_COLUMNS
    present, else var_names; names come from NAME_COLUMNS, else var_names when that is not the key."""
    if gene_key is not None and gene_key != VAR_NAMES and gene_key not in var.columns:
        raise ValueError(f"{where}: gene key {gene_key!r} is not a var column; columns: "
                         f"{[VAR_NAMES, *map(str, var.columns)]}")
    key_col = gene_key or next((c for c in ID_COLUMNS if c in var.columns), VAR_NAMES)
    name_col = next((c for c in NAME_COLUMNS if c in var.columns and c != key_col), None)
    if name_col is None and key_col != VAR_NAMES:
        name_col = VAR_NAMES
    key_source, keys = _column(var, key_col)
    for i, k in enumerate(keys):
        if not k.strip() or k == "nan":
            raise ValueError(f"{where}: gene #{i} has an empty {key_source} ({k!r})")
    names_source, names = _column(var, name_col) if name_col else (None, None)
    return FileGenes(where, key_source, keys, names_source, names, gene_key is not None)


@dataclass(frozen=True)
class ResolvedGenes:
    """One file's genes in the chosen scheme: keys[i] is gene i's vocab id (None: no id in the
    scheme, so the gene is left out), names[i] its name."""
    where: str
    detected: Detection
    how: str
    keys: tuple[str | None, ...]
    names: tuple[str, ...]

    @property
    def n_without_key(self) -> int:
        return sum(k is None for k in self.keys)

    def describe(self) -> dict:
        return {"gene_ids": self.how, "detected": str(self.detected), "genes": len(self.keys)}


def choose_scheme(requested: str, files: Sequence[FileGenes]) -> str:
    """The scheme of the set: the requested one, or for 'auto' the one every file was detected as."""
    if requested not in REQUESTABLE_SCHEMES:
        raise ValueError(f"gene-id scheme must be one of {REQUESTABLE_SCHEMES}, got {requested!r}")
    if requested != "auto":
        return requested
    detections = [(f, detect_scheme(f.keys)) for f in files]
    ambiguous = [f"{f.where}: {f.key_source} {d}" for f, d in detections if d.scheme is None]
    if ambiguous:
        raise ValueError("cannot detect the gene-id scheme of " + "; ".join(ambiguous)
                         + f" (at least {SCHEME_MAJORITY:.0%} of ids must agree); choose a column with --gene-key")
    schemes = {d.scheme for _, d in detections}
    if len(schemes) > 1:
        raise ValueError("the files use different gene-id schemes: "
                         + "; ".join(f"{f.where}: {f.key_source} {d}" for f, d in detections)
                         + "; pass --gene-id-scheme ensembl|symbol and a --gene-map TSV to convert")
    return schemes.pop()


def _first_keeps_duplicates(keys: list[str | None]) -> list[str | None]:
    # Converting ids can give two genes of a file one key; the first keeps it, as map_genes would.
    seen: set[str] = set()
    out = []
    for k in keys:
        u = None if k is None else union_key(k)
        out.append(None if u is None or u in seen else k)
        if u is not None:
            seen.add(u)
    return out


def _check_unique(keys: Sequence[str], source: str, where: str) -> None:
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in first:
            raise ValueError(f"{where}: duplicate gene id {k!r} in {source} (genes #{first[k]} and #{i})")
        first[k] = i


def resolve_genes(genes: FileGenes, scheme: str, gene_map: GeneMap | None) -> ResolvedGenes:
    """Key one file's genes in `scheme`: its key column if that is the scheme, else its names
    column if that is (and --gene-key did not pin the column), else through the gene map."""
    detected = detect_scheme(genes.keys)
    if detected.scheme is None:
        raise ValueError(f"{genes.where}: cannot tell the gene-id scheme of {genes.key_source}: {detected} "
                         f"(at least {SCHEME_MAJORITY:.0%} must agree); choose a column with --gene-key")
    if detected.scheme == scheme:
        _check_unique(genes.keys, genes.key_source, genes.where)
        names = genes.names if scheme == "ensembl" and genes.names is not None else genes.keys
        if scheme == "ensembl" and genes.names is None and gene_map is not None:
            names = tuple(gene_map.symbol_of(k) or k for k in genes.keys)
        return ResolvedGenes(genes.where, detected, genes.key_source, genes.keys, tuple(names))
    if not genes.key_given and genes.names is not None and detect_scheme(genes.names).scheme == scheme:
        keys = _first_keeps_duplicates(list(genes.names))
        names = genes.names if scheme == "symbol" else genes.keys
        return ResolvedGenes(genes.where, detected, genes.names_source, tuple(keys), names)
    if gene_map is None:
        raise ValueError(f"{genes.where}: gene ids in {genes.key_source} look like {detected}, but the gene-id "
                         f"scheme is {scheme!r}: give --gene-map TSV to convert them"
                         + ("" if genes.key_given else f" (or --gene-key a var column holding {scheme} ids)"))
    if scheme == "symbol":
        keys = [gene_map.symbol_of(k) for k in genes.keys]
        names = tuple(k or g for k, g in zip(keys, genes.keys))
    else:
        keys = [gene_map.ensembl_of(k) for k in genes.keys]
        names = genes.keys
    how = f"{genes.key_source} via gene map {Path(gene_map.path).name}"
    return ResolvedGenes(genes.where, detected, how, tuple(_first_keeps_duplicates(keys)), tuple(names))


@dataclass(frozen=True)
class GeneUnion:
    scheme: str
    files: tuple[ResolvedGenes, ...]
    feature_ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    columns: tuple[tuple[int, ...], ...]  # per file: union index of each file gene, -1 if left out


def union_genes(resolved: Sequence[ResolvedGenes], scheme: str) -> GeneUnion:
    """First appearance over the files in order; a gene's name is the one given where it first appears."""
    index: dict[str, int] = {}
    ids: list[str] = []
    names: list[str] = []
    columns = []
    for r in resolved:
        col, taken = [], set()
        for key, name in zip(r.keys, r.names):
            u = None if key is None else union_key(key)
            if u is None or u in taken:  # two versions of one Ensembl id in a file: the first keeps it
                col.append(-1)
                continue
            taken.add(u)
            if u not in index:
                index[u] = len(ids)
                ids.append(key)
                names.append(name)
            col.append(index[u])
        columns.append(tuple(col))
    return GeneUnion(scheme, tuple(resolved), tuple(ids), tuple(names), tuple(columns))


def resolve_union(files: Sequence[FileGenes], requested_scheme: str, gene_map: GeneMap | None) -> GeneUnion:
    """Choose the scheme, key every file in it (all files' problems in one error), take the union."""
    scheme = choose_scheme(requested_scheme, files)
    resolved, errors = [], []
    for f in files:
        try:
            resolved.append(resolve_genes(f, scheme, gene_map))
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("; ".join(errors))
    return union_genes(resolved, scheme)


__all__ = ["SCHEMES", "REQUESTABLE_SCHEMES", "VAR_NAMES", "Detection", "GeneMap", "FileGenes", "ResolvedGenes",
           "GeneUnion", "looks_ensembl", "union_key", "detect_scheme", "file_genes", "choose_scheme",
           "resolve_genes", "union_genes", "resolve_union"]
