"""scripts/demo.py end to end in its --quick setting, and its configs: the switches of Table 4 at one size."""

import csv
import sys
from pathlib import Path

import timm
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo  # noqa: E402
from trainlib.building import build_model  # noqa: E402
from trainlib.config import load_config, to_dict  # noqa: E402

from atlas.longrange import LongRangeMatch  # noqa: E402
from atlas.viz import cut_routes  # noqa: E402

SWITCHES = {  # variant -> (multiscale, top_down, bottom_up)
    "window": (False, True, True),
    "multiscale": (True, False, False),
    "bottom_up": (True, False, True),
    "top_down": (True, True, False),
    "msa": (True, True, True),
}


def load(variant: str):
    return load_config(demo.CONFIGS / f"{variant}.yaml")


def test_variants_differ_only_in_the_attention_and_have_one_size():
    cfgs = {v: load(v) for v in demo.VARIANTS}
    shared = {
        v: {k: x for k, x in to_dict(c).items() if k in ("data", "aug", "optimizer", "schedule", "train")}
        for v, c in cfgs.items()
    }
    assert all(s == shared["msa"] for s in shared.values())  # same data, recipe and steps for everyone

    models = {v: build_model(c) for v, c in cfgs.items()}
    vit = models.pop("vit")
    for variant, model in models.items():
        cfg = model.config
        assert (cfg.multiscale, cfg.top_down, cfg.bottom_up) == SWITCHES[variant]
        layout = cfg.layout
        assert layout.num_scales == (2 if cfg.multiscale else 1) and layout.scales[0].num_windows == 4
        assert model.embed_dim == vit.embed_dim == 64
        assert sum(len(stage.blocks) for stage in model.stages) == len(vit.blocks) == 3
        assert layout.scales[0].num_tokens == vit.patch_embed.num_patches == 64


def test_paper_numbers_are_the_papers_table4():
    table = yaml.safe_load((ROOT / "scripts" / "data" / "paper_results.yaml").read_text())[4]["rows"]
    paper = {row["row"]: row["top1"] for row in table}
    for variant in SWITCHES:
        cfg = load(variant)
        assert cfg.paper_table == 4 and paper[cfg.paper_row] == cfg.paper_top1
    assert load("vit").paper_top1 is None


def test_quick_demo_writes_tables_figures_and_a_model_that_reproduces_its_accuracy(tmp_path, monkeypatch):
    epochs_drawn = []
    set_epoch = LongRangeMatch.set_epoch
    monkeypatch.setattr(LongRangeMatch, "set_epoch", lambda ds, e: (epochs_drawn.append(e), set_epoch(ds, e)))
    args = [
        "--quick",
        "--variants",
        "window",
        "msa",
        "--out",
        str(tmp_path),
        "--threads",
        "1",
        "--jobs",
        "1",
        "--seeds",
        "3",
        "4",
    ]
    results = demo.main(args)
    assert [(r.variant, r.seed) for r in results] == [("window", 3), ("window", 4), ("msa", 3), ("msa", 4)]
    assert epochs_drawn == [0, 1] * 4  # train.py asks the task for each epoch's images
    assert [len(r.epochs) for r in results] == [2] * 4
    for name in ("table.csv", "table.md", "runs.csv", "learning_curves.png", "accuracy.png", "atlas_msa.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    for name in ("cost.md", "cost.png"):  # the cost part, at its quick sizes
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "cost.csv", newline="") as f:
        cost_rows = list(csv.DictReader(f))
    assert [(r["model"], int(r["px"]), int(r["tokens"])) for r in cost_rows] == [
        (m, px, (px // 4) ** 2) for px in demo.COST_QUICK_SIZES for m in demo.COST_MODELS
    ]
    assert "Table 6" in (tmp_path / "cost.md").read_text()
    for seed in (3, 4):
        assert yaml.safe_load((tmp_path / "runs" / f"msa_seed{seed}" / "config.yaml").read_text())["seed"] == seed

    with open(tmp_path / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["variant"] for row in rows] == [results[0].name, results[2].name]
    assert [row["paper top-1 (%)"] for row in rows] == ["59.39", "72.02"]
    for row, runs in zip(rows, (results[:2], results[2:]), strict=True):
        top1 = [r.top1 for r in runs]
        assert float(row["our top-1, mean (%)"]) == round(sum(top1) / 2, 1)
        assert row["our top-1, range (%)"] == f"{min(top1):.1f} to {max(top1):.1f}"
        assert row["seeds solved (top-1 >= 90%)"] == f"{sum(t >= demo.SOLVED for t in top1)} of 2"
    assert (tmp_path / "table.md").read_text().count("\n") == 2 + len(rows)
    with open(tmp_path / "runs.csv", newline="") as f:
        assert [float(row["top-1 (%)"]) for row in csv.DictReader(f)] == [round(r.top1, 2) for r in results]

    ckpt = torch.load(tmp_path / "atlas_msa.pt", map_location="cpu", weights_only=True)
    model = timm.create_model(ckpt["model_name"], **ckpt["model_kwargs"]).eval()
    model.load_state_dict(ckpt["state_dict"])
    cfg = load_config(demo.CONFIGS / "msa.yaml", demo.QUICK)
    assert ckpt["task"] == {"name": cfg.data.name, **cfg.data.kwargs}
    top1 = demo.val_top1(model, cfg)
    assert abs(top1 - ckpt["val_top1"]) < 1e-6 and ckpt["val_top1"] == results[2].top1  # the first seed's
    assert set(results[2].cuts) == set(demo.CUTS) and results[0].cuts == {}  # MSA has both directions to close


def test_cost_models_are_three_blocks_of_each_kind_at_the_demos_width():
    """Window attention: one scale; MSA: every scale in one stack, none dropped; ViT: global attention."""
    window, msa, vit = (demo.cost_builder(*demo.COST_MODELS[m])(128) for m in ("window", "msa", "vit"))
    assert window.config.layout.num_scales == 1 and msa.config.layout.num_scales == 3  # 32x32 tokens: 32, 8, 2
    assert msa.config.composition == "stack" and (msa.config.top_down, msa.config.bottom_up) == (True, True)
    assert sum(len(s.blocks) for s in window.stages) == sum(len(s.blocks) for s in msa.stages) == len(vit.blocks) == 3
    assert window.embed_dim == msa.embed_dim == vit.embed_dim == 64
    assert demo.tokens_at(128) == vit.patch_embed.num_patches == window.config.layout.scales[0].num_tokens == 1024


def test_route_cuts_close_each_direction_as_the_masks_of_cut_routes_do(tmp_path, monkeypatch):
    """route_cuts closes top-down through the ``top_down=False`` model and bottom-up through ``cut_routes``; the
    first must compute what hiding every coarser key from every window computes, with the same weights."""
    config, run_dir = demo.CONFIGS / "msa.yaml", tmp_path / "msa_seed0"
    run_dir.mkdir()
    cfg = demo.run_config(config, run_dir, 0, [])
    torch.manual_seed(0)
    model = build_model(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)  # answers that depend on every route, unlike a model at initialisation
    torch.save({"model": model.state_dict()}, run_dir / "last.pt")
    images = torch.randn(4, 3, 32, 32)

    def mean_logit(model, cfg):  # stands in for the accuracy: a score that moves with any change of the model
        with torch.no_grad():
            return model.eval()(images)[:, 1].mean().item()

    monkeypatch.setattr(demo, "val_top1", mean_logit)
    cuts = demo.route_cuts(config, run_dir, 0, [])
    assert set(cuts) == set(demo.CUTS)

    def hide_coarser_keys(stage, masks):
        for l, mask in enumerate(masks):
            mask[:, model.config.layout.scales[stage + l].tokens_per_window :] = False

    with cut_routes(model, edit=hide_coarser_keys):
        assert abs(cuts["top-down"] - mean_logit(model, cfg)) < 1e-4
    with cut_routes(model, bottom_up=False):
        assert abs(cuts["bottom-up"] - mean_logit(model, cfg)) < 1e-4
    as_trained = mean_logit(model, cfg)
    assert min(abs(cuts["top-down"] - as_trained), abs(cuts["bottom-up"] - as_trained)) > 1e-3  # both matter
    assert demo.route_cuts(demo.CONFIGS / "window.yaml", run_dir, 0, []) == {}  # nothing to close


def test_steps_to_solve_is_the_first_evaluation_at_or_above_the_threshold():
    def run(*top1):
        epochs = [{"step": 24 * (i + 1), "val_top1": t} for i, t in enumerate(top1)]
        return demo.Result("msa", 0, "MSA", 72.02, top1[-1], 0.1, 1.0, 1, epochs, [], {})

    assert run(50.0, demo.SOLVED, 100.0).steps_to_solve == 48
    assert run(50.0, 89.9, 50.0).steps_to_solve is None  # never solved
    assert run(95.0, 60.0, 100.0).steps_to_solve == 24  # the first time counts, whatever follows
