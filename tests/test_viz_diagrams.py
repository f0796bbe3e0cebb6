"""The "MSA block at a glance" diagram, the keys one query reads, and the notebooks' layout pictures: shapes,
supports and what is drawn, from the layout."""

import matplotlib
import numpy as np
import torch

from atlas import MSABlock
from atlas.msa import BlockGeometry
from atlas.scales import MultiScaleLayout, build_pyramid
from atlas.viz import (
    draw_containment_tree,
    label_window_reads,
    msa_block_steps,
    plot_msa_block,
    plot_query_reads,
    plot_token_masks,
    query_reads,
)

matplotlib.use("Agg")


def test_block_steps_at_2048px_list_the_real_shapes_in_the_order_the_block_runs():
    steps = msa_block_steps(MultiScaleLayout((128, 128)))
    assert [(s.phase, s.scale) for s in steps] == [
        ("position", 1),
        ("position", 2),
        ("position", 3),
        ("summarise", 2),
        ("summarise", 3),
        ("top-down", 3),
        ("top-down", 2),
        ("top-down", 1),
        ("bottom-up", 2),
        ("bottom-up", 3),
    ]
    shapes = {(s.phase, s.scale): s.shapes for s in steps}
    assert shapes["position", 1] == "map (B, 128, 128, C)"
    assert shapes["top-down", 1] == "q (B, 64, 256, C), kv (B, 64, 576, 2C)"  # 256 own + 256 + 64 coarse keys
    assert shapes["top-down", 3] == "q (B, 1, 64, C), kv (B, 1, 64, 2C)"
    assert shapes["bottom-up", 2] == "q (B, 64, 16, C), kv (B, 64, 256, 2C)"
    assert shapes["bottom-up", 3] == "q (B, 4, 16, C), kv (B, 4, 256, 2C)"


def test_switches_and_later_stages_change_the_steps():
    layout = MultiScaleLayout((128, 128))
    plain = msa_block_steps(layout, top_down=False, bottom_up=False, dim=768)
    assert not any(s.phase == "bottom-up" for s in plain)
    assert {s.shapes for s in plain if s.phase == "top-down" and s.scale == 1} == {
        "q (B, 64, 256, 768), kv (B, 64, 256, 1536)"
    }
    stage2 = msa_block_steps(layout, first=1)
    assert sorted({s.scale for s in stage2}) == [2, 3]


def test_block_steps_match_the_tensors_the_block_attends_over():
    layout = MultiScaleLayout((20, 24), window_size=4, pool_stride=2)
    block = MSABlock(8, 2, layout.num_scales).eval()
    maps = build_pyramid(torch.randn(1, 20, 24, 8), layout)
    for layer in block.scales:
        layer.attn.records = []  # what record_attention does for a whole model
    with torch.no_grad():
        block(maps, BlockGeometry.build(layout, 0, "containing", True))
    got = {(r.kind, r.query_scale + 1): tuple(r.weights.shape) for layer in block.scales for r in layer.attn.records}
    assert len(got) == 2 * layout.num_scales - 1
    for step in msa_block_steps(layout, batch=1, dim=8):
        if step.phase in ("top-down", "bottom-up"):
            q = [int(v) for v in step.shapes.split("q (")[1].split(")")[0].split(", ")]
            kv = [int(v) for v in step.shapes.split("kv (")[1].split(")")[0].split(", ")]
            b, n_w, heads, t_q, t_k = got[step.phase.replace("-", "_"), step.scale]
            assert (b, n_w, t_q, t_k) == (q[0], q[1], q[2], kv[2]) and kv[1] == n_w


def test_diagram_has_one_box_per_step():
    layout = MultiScaleLayout((64, 64))
    fig = plot_msa_block(layout)
    texts = [t.get_text() for t in fig.axes[0].texts]
    for step in msa_block_steps(layout):
        assert step.shapes in texts
    assert len(fig.axes[0].patches) == 2 * len(msa_block_steps(layout)) - 1  # boxes and the arrows between them


def test_query_reads_its_window_and_the_windows_containing_it():
    layout = MultiScaleLayout((128, 128))
    reads = query_reads(layout, (70, 40))
    assert [int(g.sum()) for g in reads.values()] == [256, 256, 64]
    assert reads[0][64:80, 32:48].all() and reads[0].sum() == 256  # window (4, 2) of the 8x8 grid
    assert reads[1][16:32, 0:16].all()  # scale-2 window (1, 0) contains it
    contained = query_reads(layout, (5, 70))[1]  # fine window (0, 4), inside scale-2 window (0, 1)
    released = query_reads(layout, (5, 70), routing="released")[1]  # paired with window 4 // 16 = (0, 0)
    assert contained[0:16, 16:32].all() and released[0:16, 0:16].all() and not np.array_equal(released, contained)
    assert len(plot_query_reads(np.zeros((256, 256, 3)), layout, (70, 40)).axes) == 3


def test_diagram_fits_a_page_800_px_wide_at_72_dpi():
    fig = plot_msa_block(MultiScaleLayout((128, 128)))
    assert fig.get_size_inches()[0] * 72 <= 800
    assert min(t.get_fontsize() for t in fig.axes[0].texts) >= 10


def test_window_reads_label_every_fine_window_with_the_window_it_reads():
    import matplotlib.pyplot as plt

    layout = MultiScaleLayout((128, 128))
    reads = layout.containing_windows(0, 1)
    fig, ax = plt.subplots()
    label_window_reads(ax, np.zeros((256, 256, 3)), layout, reads, "containing")
    assert [int(t.get_text()) for t in ax.texts] == reads.tolist()  # one label per fine window, row-major
    plt.close(fig)


def test_containment_tree_joins_every_window_to_its_parent():
    import matplotlib.pyplot as plt

    layout = MultiScaleLayout((128, 128))
    parents = [layout.containing_windows(l, l + 1) for l in range(layout.num_scales - 1)]
    fig, ax = plt.subplots()
    draw_containment_tree(ax, layout, parents)
    grid_lines = sum(sc.grid[0] + sc.grid[1] + 2 for sc in layout.scales)
    assert len(ax.lines) == grid_lines + sum(len(p) for p in parents)  # 64 + 4 edges
    plt.close(fig)


def test_token_masks_picture_keeps_every_pair_and_groups_each_window():
    import matplotlib.pyplot as plt

    layout = MultiScaleLayout((8, 8), window_size=4, pool_stride=2)  # 64 + 16 + 4 tokens
    sizes = [sc.num_tokens for sc in layout.scales]
    n = sum(sizes)
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    window = (rows // 4) * 2 + cols // 4  # the window of each scale-1 token, row-major
    top_down = torch.zeros(n, n, dtype=torch.bool)
    top_down[:64, :64] = window[:, None] == window[None, :]  # scale 1 reads its own window
    bottom_up = torch.zeros(n, n, dtype=torch.bool)
    bottom_up[64:80, :16] = True
    fig, ax = plt.subplots()
    plot_token_masks(ax, layout, top_down, bottom_up, "test")
    picture = np.asarray(ax.images[0].get_array())
    assert (picture == 1).sum() == top_down.sum() and (picture == 2).sum() == bottom_up.sum()
    assert (picture[:16, :16] == 1).all() and (picture[:16, 16:64] == 0).all()  # window 0's tokens read window 0
    plt.close(fig)
