"""The perturbation data path without the training loop: the GEARS directory (reading, bad input),
counts -> GEARS, the simulated screen, GEARS' simulation split, pair batches and their resume,
and the model's forward and loss."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from perturb_fixtures import SMALL_SIM, write_sim, write_tiny_init

from celljepa_dist.data.vocab import GeneVocab
from celljepa_dist.perturb.config import PerturbDataConfig
from celljepa_dist.perturb.data import (
    PairLoader,
    PerturbCells,
    eval_batches,
    gene_chunks,
    open_pair_loader,
    select_genes,
)
from celljepa_dist.perturb.gears_data import GEARS_FILE, GearsDataError, load_gears_dir, parse_condition
from celljepa_dist.perturb.prepare import check_raw_counts, counts_to_gears, write_gears_dir
from celljepa_dist.perturb.simulate import TRUTH_FILE
from celljepa_dist.perturb.split import SUBGROUPS, SplitError, check_subgroups, simulation_split


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("perturb_sim")
    return write_sim(root), write_tiny_init(root)


def test_parse_condition_is_gears_format_only():
    assert parse_condition("ctrl") == ()
    assert parse_condition("A+ctrl") == ("A",) == parse_condition("ctrl+A")
    assert parse_condition("A+B") == ("A", "B")
    for bad in ("A", "A+B+C", "", "+A", "ctrl+ctrl"):
        with pytest.raises(ValueError, match="GEARS"):
            parse_condition(bad)


def test_simulated_directory_reads_back_with_known_effects(sim):
    gears_dir, _ = sim
    data = load_gears_dir(gears_dir)
    truth = json.loads((gears_dir / TRUTH_FILE).read_text())
    assert data.X.shape == (SMALL_SIM.control_cells + (SMALL_SIM.perturbed_genes + SMALL_SIM.combos)
                            * SMALL_SIM.cells_per_perturbation, SMALL_SIM.genes)
    assert len(data.perturbations) == SMALL_SIM.perturbed_genes + SMALL_SIM.combos
    assert set(truth["combos"].values()) <= {"additive", "synergy", "buffering"}
    ctrl = data.control_mean()
    for gene in truth["perturbed_genes"][:4]:
        cond = f"{gene}+ctrl"
        col = data.gene_index(gene)
        assert data.mean(cond)[col] < ctrl[col] - 1.0  # the knock-down of the target itself
        assert col in data.de_idx(cond)  # ... which GEARS' DE ranking finds among the top 20
        assert len(data.non_dropout_idx(cond)) == 20
    # Genes beyond the target move too (down and up).
    delta = data.mean(f"{truth['perturbed_genes'][0]}+ctrl") - ctrl
    assert (delta > 0.3).sum() >= 3 and (delta < -0.3).sum() >= 3


def _write(adata, d):
    d.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(d / GEARS_FILE)
    return d


def test_bad_gears_directories_name_what_is_wrong(sim, tmp_path):
    gears_dir, _ = sim
    good = ad.read_h5ad(gears_dir / GEARS_FILE)
    with pytest.raises(GearsDataError, match="not found"):
        load_gears_dir(tmp_path / "nowhere")

    bad = good.copy()
    cats = bad.obs["condition"].astype(str).values.copy()
    cats[cats == cats[-1]] = "NOTAGENE+ctrl"
    bad.obs["condition"] = cats
    with pytest.raises(GearsDataError, match=r"'NOTAGENE\+ctrl' \(20 cells\) names gene\(s\) \['NOTAGENE'\]"):
        load_gears_dir(_write(bad, tmp_path / "gene"))

    noctrl = good[good.obs["condition"].astype(str) != "ctrl"].copy()
    with pytest.raises(GearsDataError, match="no control cells"):
        load_gears_dir(_write(noctrl, tmp_path / "noctrl"))

    counts = good.copy()
    counts.X = counts.layers["counts"]
    with pytest.raises(GearsDataError, match="looks like raw counts"):
        load_gears_dir(_write(counts, tmp_path / "counts"))

    nouns = good.copy()
    del nouns.uns["top_non_dropout_de_20"]
    with pytest.raises(GearsDataError, match="top_non_dropout_de_20"):
        load_gears_dir(_write(nouns, tmp_path / "nouns"))


def _counts_adata(rng, labels):
    X = rng.poisson(3.0, size=(len(labels), 30)).astype(np.float32)
    X[np.array(labels) == "G0", 1] += 40  # G0 raises gene 1
    return ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"pert": labels}, index=[f"c{i}" for i in range(len(labels))]),
                      var=pd.DataFrame({"symbol": [f"G{i}" for i in range(30)]}, index=[f"ENSG{i:05d}" for i in range(30)]))


def test_counts_to_gears_as_gears_processes_and_rejects_log_normalised_input(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["non-targeting"] * 40 + ["G0"] * 20 + ["G2+G3"] * 20
    raw = _counts_adata(rng, labels)
    out = counts_to_gears(raw, "pert", ["non-targeting"], gene_name_key="symbol")
    assert sorted(out.obs["condition"].unique()) == ["G0+ctrl", "G2+G3", "ctrl"]
    assert set(out.uns["rank_genes_groups_cov_all"]) == {"cell_G0+ctrl_1+1", "cell_G2+G3_1+1"}
    assert out.uns["rank_genes_groups_cov_all"]["cell_G0+ctrl_1+1"][0] == "ENSG00001"  # the gene G0 raised
    # X = log1p(counts / total * 1e4)
    c0 = raw.X[0].toarray().ravel()
    np.testing.assert_allclose(out.X[0].toarray().ravel(), np.log1p(c0 / c0.sum() * 1e4), rtol=1e-5)
    data = load_gears_dir(write_gears_dir(out, tmp_path / "g").parent)
    assert data.perturbations == ["G0+ctrl", "G2+G3"]

    lognorm = raw.copy()
    lognorm.X = sp.csr_matrix(np.log1p(raw.X.toarray()))
    with pytest.raises(GearsDataError, match="non-integer values .*looks log-normalised"):
        counts_to_gears(lognorm, "pert", ["non-targeting"], gene_name_key="symbol")
    with pytest.raises(GearsDataError, match="negative"):
        check_raw_counts(sp.csr_matrix(np.array([[1.0, -2.0]])), "X")
    missing = raw.copy()
    missing.obs["pert"] = ["non-targeting"] * 40 + ["NOPE"] * 40
    with pytest.raises(GearsDataError, match="NOPE"):
        counts_to_gears(missing, "pert", ["non-targeting"], gene_name_key="symbol")
    noctrl = raw[40:].copy()
    with pytest.raises(GearsDataError, match="no control cells"):
        counts_to_gears(noctrl, "pert", ["non-targeting"], gene_name_key="symbol")


PERTS = [f"G{i}+ctrl" for i in range(12)] + [f"G{i}+G{j}" for i in range(12) for j in range(i + 1, 12) if (i + j) % 3 == 0]


def test_simulation_split_partitions_by_seen_genes():
    split = simulation_split(PERTS, seed=1)
    everything = split.train + split.val + split.test
    assert sorted(everything) == sorted(PERTS + ["ctrl"]) and len(everything) == len(set(everything))
    assert sorted(sum(split.test_subgroups.values(), [])) == sorted(split.test)
    train_genes = {g for p in split.train + split.val if p != "ctrl" and len(parse_condition(p)) == 1
                   for g in parse_condition(p)}
    for p in split.test_subgroups["unseen_single"]:
        assert len(parse_condition(p)) == 1 and parse_condition(p)[0] not in train_genes
    for k in (0, 1, 2):
        for p in split.test_subgroups[f"combo_seen{k}"]:
            assert sum(g in train_genes for g in parse_condition(p)) == k
    # combos with both genes seen that are *not* held out train (or validate)
    assert any(len(parse_condition(p)) == 2 for p in split.train)
    assert simulation_split(PERTS, seed=1) == split  # deterministic
    reordered = simulation_split(list(reversed(PERTS)), seed=1)  # the sets do not depend on the order
    assert {k: sorted(v) for k, v in reordered.test_subgroups.items()} == \
        {k: sorted(v) for k, v in split.test_subgroups.items()}
    assert simulation_split(PERTS, seed=2).test != split.test


def test_split_that_leaves_a_subgroup_empty_is_an_error():
    singles_only = [f"G{i}+ctrl" for i in range(12)]
    split = simulation_split(singles_only, seed=1)
    check_subgroups(split, SUBGROUPS, has_combos=False)  # Adamson: no combos, only unseen_single needed
    with pytest.raises(SplitError, match=r"split seed 1 leaves test subgroup\(s\) \['combo_seen0'"):
        check_subgroups(split, SUBGROUPS, has_combos=True)
    with pytest.raises(SplitError, match="split seed 0: no training perturbation"):
        check_subgroups(simulation_split(["G0+ctrl", "G1+ctrl"], seed=0), ["unseen_single"], has_combos=False)


def test_select_genes_always_keeps_the_perturbed_genes():
    cols = np.arange(100)
    keep = np.array([7, 93])
    for seed in range(20):
        chosen = select_genes(cols, keep, 10, np.random.default_rng(seed))
        assert len(chosen) == 10 and set(keep) <= set(chosen) and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(select_genes(cols, keep, 500, np.random.default_rng(0)), cols)
    chunks = gene_chunks(cols, keep, 30)
    assert all(set(keep) <= set(c) and len(c) <= 30 for c in chunks)
    assert sorted(set(np.concatenate(chunks))) == list(cols)


@pytest.fixture(scope="module")
def cells(sim):
    gears_dir, init = sim
    data = load_gears_dir(gears_dir)
    split = simulation_split(data.perturbations, seed=1)
    return PerturbCells.build(data, split, GeneVocab.load(init / "vocab.json"))


def test_pair_batches_carry_control_inputs_perturbed_targets_and_flags(cells):
    cfg = PerturbDataConfig(gears_dir="x", batch_size=8, max_genes=50, seed=3)
    batch = PairLoader(cells, cfg, 0, 1, epoch=0).batch(0)
    data = cells.data
    assert batch["gene_ids"].shape == (8, 51)
    for i, row in enumerate(batch["cell_ids"].tolist()):
        cond = cells.condition_of(row)
        assert cond in cells.split.train
        cols = batch["gene_cols"][i, 1:].numpy()
        np.testing.assert_allclose(batch["target_values"][i, 1:].numpy(), data.dense_rows([row])[0, cols])
        flagged = set(cols[batch["pert_flags"][i, 1:].numpy() == 1])
        assert flagged == set(cells.pert_cols[cond].tolist())  # every perturbed gene present and flagged
        assert batch["pert_flags"][i, 0] == 2 and batch["gene_ids"][i, 0] == 1  # <cls>
    # inputs are a control cell's values
    ctrl = data.dense_rows(cells.ctrl_rows)
    for i in range(8):
        cols = batch["gene_cols"][i, 1:].numpy()
        assert (np.abs(ctrl[:, cols] - batch["values"][i, 1:].numpy()).max(axis=1) == 0).any()


def test_loader_is_pure_partitioned_and_resumes_exactly(cells):
    cfg = PerturbDataConfig(gears_dir="x", batch_size=8, max_genes=40, seed=0)
    full = list(PairLoader(cells, cfg, 0, 1, epoch=1))
    again = list(PairLoader(cells, cfg, 0, 1, epoch=1))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full, again) for k in a)
    first = PairLoader(cells, cfg, 0, 1, epoch=1)
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = open_pair_loader(cells, cfg, 0, 1, 1, first.state_dict(3))
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(full[3:], rest) for k in a)
    # two ranks: same count, disjoint cells, together the first 2 * n batches of the epoch order
    r0, r1 = PairLoader(cells, cfg, 0, 2, 1), PairLoader(cells, cfg, 1, 2, 1)
    assert len(r0) == len(r1) > 0
    ids0 = torch.cat([b["cell_ids"] for b in r0]).tolist()
    ids1 = torch.cat([b["cell_ids"] for b in r1]).tolist()
    assert not set(ids0) & set(ids1)
    other_epoch = next(iter(PairLoader(cells, cfg, 0, 1, epoch=2)))
    assert not torch.equal(other_epoch["cell_ids"], full[0]["cell_ids"])
    with pytest.raises(ValueError, match="cannot resume epoch 2"):
        open_pair_loader(cells, cfg, 0, 1, 2, first.state_dict(3))


def test_eval_batches_cover_every_gene_of_every_cell_once(cells):
    cfg = PerturbDataConfig(gears_dir="x", batch_size=16, eval_max_genes=60, eval_cells_per_perturbation=3)
    conds = cells.split.test_subgroups["unseen_single"][:2]
    rows = np.concatenate([cells.data.rows(c)[:3] for c in conds])
    seen: dict[int, list] = {}
    for b in eval_batches(cells, rows, cfg, seed=0):
        for i, r in enumerate(b["cell_ids"].tolist()):
            cols = b["gene_cols"][i]
            seen.setdefault(r, []).extend(cols[cols >= 0].tolist())
    for r in rows:
        pert = set(cells.pert_cols[cells.condition_of(int(r))].tolist())
        non_pert = [c for c in seen[int(r)] if c not in pert]
        assert sorted(non_pert) == sorted(set(cells.model_cols.tolist()) - pert)


def test_model_forward_flags_and_loss(sim, cells):
    from celljepa_dist.model.config import LossConfig
    from celljepa_dist.model.pretrained import from_pretrained
    from celljepa_dist.perturb.model import PerturbModel, perturb_loss, perturbed_teacher_embedding

    _, init = sim
    pre = from_pretrained(init)
    model = PerturbModel(pre.cfg)
    model.load_pretrained(pre)
    assert torch.equal(model.student.embed.gene.embedding.weight, pre.student.embed.gene.embedding.weight)
    batch = PairLoader(cells, PerturbDataConfig(gears_dir="x", batch_size=4, max_genes=30), 0, 1, 0).batch(0)
    out = model(batch)
    assert out.pred_values.shape == batch["gene_ids"].shape and out.cell_emb.shape == (4, 32)
    no_flags = dict(batch, pert_flags=torch.where(batch["pert_flags"] == 1, 0, batch["pert_flags"]))
    assert not torch.allclose(model(no_flags).pred_values, out.pred_values)  # the flags reach the output
    teacher = pre.student.eval()
    loss = perturb_loss(out, batch, LossConfig(objective="celljepa", w_jepa=1.0, w_ecs=0.8, w_mvc=0.0),
                        perturbed_teacher_embedding(teacher, batch))
    assert set(loss) == {"loss", "loss_rec", "loss_jepa", "loss_ecs"}
    genes = ~batch["padding_mask"]
    genes[:, 0] = False
    expected = ((out.pred_values - batch["target_values"])[genes] ** 2).mean()
    assert loss["loss_rec"].item() == pytest.approx(expected.item(), rel=1e-5)
    loss["loss"].backward()
    assert model.pert_embedding.weight.grad[1].abs().sum() > 0


def test_additive_baseline_recovers_the_additive_combos_of_the_split(sim):
    """The simulation's truth against the split and metric code: on held-out combos whose genes
    both trained (combo_seen2), the additive baseline recovers the additive combos and not the
    synergistic ones, and beats the mean shift there."""
    from celljepa_dist.perturb.baselines import additive, mean_shift
    from celljepa_dist.perturb.metrics import evaluate_predictions

    gears_dir, _ = sim
    data = load_gears_dir(gears_dir)
    kinds = json.loads((gears_dir / TRUTH_FILE).read_text())["combos"]
    split = simulation_split(data.perturbations, seed=1)
    seen2 = split.test_subgroups["combo_seen2"]
    add = evaluate_predictions(data, additive(data, split.train, seen2))
    shift = evaluate_predictions(data, mean_shift(data, split.train, seen2))
    additive_combos = [c for c in seen2 if kinds[c] == "additive"]
    assert len(additive_combos) >= 2, seen2
    for c in additive_combos:
        assert add[c]["pearson_delta"] > 0.6, (c, add[c]["pearson_delta"])  # 20 noisy cells per perturbation
        assert add[c]["pearson_delta"] > shift[c]["pearson_delta"], c
    # Over every combo of the data (all singles trained), additivity is what separates the kinds.
    singles = [p for p in data.perturbations if len(parse_condition(p)) == 1] + ["ctrl"]
    combos = [p for p in data.perturbations if len(parse_condition(p)) == 2]
    every = evaluate_predictions(data, additive(data, singles, combos))
    by_kind = {k: np.mean([every[c]["pearson_delta"] for c in combos if kinds[c] == k]) for k in set(kinds.values())}
    assert by_kind["additive"] > 0.9 and by_kind["additive"] > by_kind["synergy"] + 0.05, by_kind


def test_run_setup_refuses_bad_input_before_any_engine(sim, tmp_path):
    from celljepa_dist.perturb.config import load_perturb_config
    from celljepa_dist.perturb.task import PerturbTask
    from celljepa_dist.train.engine import DistInfo

    gears_dir, init = sim
    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")

    def prepare(*sets):
        cfg = load_perturb_config(None, [f"init={init}", f"data.gears_dir={gears_dir}", f"run_dir={tmp_path / 'r'}",
                                         *sets])
        return PerturbTask().prepare(cfg, info)

    prepared = prepare("data.batch_size=8")
    assert prepared.cfg.model.d_model == 32  # the init's model, not the config's default
    assert (tmp_path / "r" / "perturb_split.json").exists()
    # A split seed whose held-out set has no combo with both genes unseen: named, with the sizes.
    empty_seed = next(s for s in range(50) if not simulation_split(load_gears_dir(gears_dir).perturbations,
                                                                     s).test_subgroups["combo_seen0"])
    with pytest.raises(SplitError, match=f"split seed {empty_seed} leaves test subgroup.*combo_seen0"):
        prepare(f"data.split_seed={empty_seed}")
    prepare(f"data.split_seed={empty_seed}", "data.subgroups=[unseen_single,combo_seen1,combo_seen2]")
    with pytest.raises(ValueError, match="no full batch"):
        prepare("data.batch_size=100000")
    with pytest.raises(Exception, match="init='': must be set"):
        load_perturb_config(None, [f"data.gears_dir={gears_dir}"])
