"""Attention maps and drawings of scales and windows over an image.

Recording is off by default and costs nothing then; inside :func:`record_attention` every attention call
computes its weights explicitly and keeps them::

    with record_attention(model) as maps:
        model(images)
    grids = maps.query(stage=0, block=1, scale=0, head=0, query=(20, 33))  # {scale: (h_s, w_s) weights}

Plotting needs matplotlib (the ``notebooks`` extra); it is imported only by the functions that draw.
:func:`plot_attention_view` draws one query's attention at every scale; :class:`AttentionExplorer` is the
same view as an interactive ipywidgets explorer (pick block, scale, head and query token). :func:`cut_routes`
closes some routes of a trained model (keys hidden from some windows, bottom-up skipped), to measure which ones
its answers need.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .attention import AttentionRecord, WindowAttention
from .model import Atlas
from .msa import BlockGeometry
from .scales import MultiScaleLayout, Scale, map_to_windows

_ADDRESS = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.scales\.(\d+)\.attn$")


@dataclass
class AttentionMaps:
    """The attention weights of one forward pass, addressed by ``(stage, block, kind, query scale)``."""

    layout: MultiScaleLayout | None = None
    records: dict[tuple[int, int, str, int], AttentionRecord] = field(default_factory=dict)

    def keys(self) -> list[tuple[int, int, str, int]]:
        return sorted(self.records)

    def query(
        self,
        stage: int,
        block: int,
        scale: int,
        query: tuple[int, int],
        head: int | None = None,
        kind: str = "top_down",
        batch: int = 0,
    ) -> dict[int, np.ndarray]:
        """Where token ``query`` = (row, col) of ``scale`` attends: ``{key scale: (h_s, w_s) weights}``.

        ``head=None`` averages the heads. Scales are absolute (0 = finest). Tokens a query does not read are 0.
        """
        record = self.records[stage, block, kind, scale]
        scales = self.layout.scales
        window, token = _query_position(scales, record, query, self.layout.pool_stride)
        weights = record.weights[batch, window]  # (heads, Tq, Tk)
        weights = weights.mean(0) if head is None else weights[head]
        row = weights[token].float().cpu().numpy()
        grids, offset = {}, 0
        for key_scale, windows in record.keys:
            sc = scales[key_scale]
            key_window = window if windows is None else int(windows[window])
            grid = grids.setdefault(key_scale, np.zeros(sc.size, dtype=np.float32))
            _scatter_window(grid, sc, key_window, row[offset : offset + sc.tokens_per_window])
            offset += sc.tokens_per_window
        return grids


def _query_position(scales, record: AttentionRecord, query: tuple[int, int], pool_stride: int) -> tuple[int, int]:
    """(window, token in window) of a query token, in the window layout the record's queries used."""
    if record.kind == "top_down":
        wh, ww = scales[record.query_scale].window
        grid_cols = scales[record.query_scale].grid[1]
    else:  # bottom-up queries are grouped by the window of the finer scale that they summarise
        finer = scales[record.query_scale - 1]
        wh = ww = finer.window[0] // pool_stride
        grid_cols = finer.grid[1]
    r, c = query
    return (r // wh) * grid_cols + c // ww, (r % wh) * ww + c % ww


def _scatter_window(grid: np.ndarray, scale: Scale, window: int, values: np.ndarray) -> None:
    """Write one window's ``values`` (row-major tokens) into the ``(h, w)`` grid of ``scale``, dropping padding."""
    wh, ww = scale.window
    r0, c0 = (window // scale.grid[1]) * wh, (window % scale.grid[1]) * ww
    block = values.reshape(wh, ww)
    h, w = min(wh, scale.size[0] - r0), min(ww, scale.size[1] - c0)
    grid[r0 : r0 + h, c0 : c0 + w] += block[:h, :w]


@contextlib.contextmanager
def record_attention(model: Atlas) -> Iterator[AttentionMaps]:
    """Record the attention weights of every block while the context is open (one forward pass)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, WindowAttention)}
    for module in modules.values():
        module.records = []
    maps = AttentionMaps()

    def remember_layout(_, args):
        maps.layout = model.config.layout_for(tuple(args[0].shape[-2:]))

    hook = model.register_forward_pre_hook(remember_layout)
    try:
        yield maps
    finally:
        hook.remove()
        for name, module in modules.items():
            stage, block, _ = (int(g) for g in _ADDRESS.search(name).groups())
            for record in module.records:
                maps.records[stage, block, record.kind, record.query_scale] = record
            module.records = None


@contextlib.contextmanager
def cut_routes(model: Atlas, edit: Callable | None = None, bottom_up: bool = True) -> Iterator[None]:
    """Run ``model`` with some attention routes closed while the context is open; its weights are not touched.

    ``edit(stage, masks)`` may set entries of a stage's top-down key masks to False: ``masks[l]`` is
    ``(windows of active scale l, keys)`` bool, a window's keys being its own tokens and then those of the window
    it reads at each coarser scale (hidden exactly as padding is). ``bottom_up=False`` skips every bottom-up pass.
    """
    original = model.geometry

    def geometry(plan, device):
        edited = []
        for stage, geo in enumerate(original(plan, device)):
            geo = copy.copy(geo)
            geo.top_down_masks = [geo.top_down_key_mask(l, device).clone() for l in range(len(geo.scales))]
            geo.flex_masks = None  # the masks above are the ones that hold
            if edit is not None:
                edit(stage, geo.top_down_masks)
            edited.append(geo)
        return edited

    blocks = [block for stage in model.stages for block in stage.blocks]
    switches = [block.bottom_up for block in blocks]
    model.geometry = geometry  # shadows the method, for this instance only
    for block in blocks:
        block.bottom_up = block.bottom_up and bottom_up
    try:
        yield
    finally:
        del model.geometry
        for block, switch in zip(blocks, switches, strict=True):
            block.bottom_up = switch


def upsample_to(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of an ``(h, w)`` grid to ``size`` pixels (for overlays)."""
    rows = (np.arange(size[0]) * grid.shape[0]) // size[0]
    cols = (np.arange(size[1]) * grid.shape[1]) // size[1]
    return grid[rows[:, None], cols[None, :]]


def load_photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> np.ndarray:
    """A photograph that scikit-image ships (``"astronaut"``, ``"coffee"``, ...; nothing is downloaded).

    Returns ``(H, W, 3)`` float32 in [0, 1], resized (bicubic, anti-aliased) to ``size`` = (H, W) when given;
    grey images are repeated over the three channels.
    """
    from skimage import data, transform, util

    image = util.img_as_float32(getattr(data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if size is not None:
        image = transform.resize(image, size, order=3, anti_aliasing=True)
    return np.clip(image, 0, 1).astype(np.float32)


def draw_windows(ax, layout: MultiScaleLayout, image_size: tuple[int, int], scale: int, **line_kwargs) -> None:
    """Draw the window borders of ``scale`` over an image of ``image_size`` pixels on a matplotlib axis."""
    sc = layout.scales[scale]
    px_per_token = (
        image_size[0] / layout.scales[0].size[0] * layout.pool_stride**scale,
        image_size[1] / layout.scales[0].size[1] * layout.pool_stride**scale,
    )
    style = {"color": "white", "linewidth": 1.0, **line_kwargs}
    for i in range(sc.grid[0] + 1):
        y = min(i * sc.window[0] * px_per_token[0], image_size[0]) - 0.5
        ax.plot([-0.5, image_size[1] - 0.5], [y, y], **style)
    for j in range(sc.grid[1] + 1):
        x = min(j * sc.window[1] * px_per_token[1], image_size[1]) - 0.5
        ax.plot([x, x], [-0.5, image_size[0] - 0.5], **style)


def plot_scales(image: np.ndarray, layout: MultiScaleLayout, maps: list[torch.Tensor] | None = None):
    """One panel per scale: the image (or a scale's feature norm) with that scale's windows drawn over it.

    ``image``: ``(H, W, 3)`` or ``(H, W)`` array. ``maps``: optional ``(h, w, C)`` maps, one per scale, shown as
    their per-token L2 norm. Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    n = layout.num_scales
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    size = image.shape[:2]
    for s, ax in enumerate(axes[0]):
        sc = layout.scales[s]
        if maps is None:
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        else:
            ax.imshow(upsample_to(maps[s].norm(dim=-1).detach().cpu().numpy(), size), cmap="magma")
        draw_windows(ax, layout, size, s)
        ax.set_title(f"scale {s + 1}: {sc.size[0]}x{sc.size[1]} tokens, {sc.grid[0]}x{sc.grid[1]} windows")
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_attention(
    image: np.ndarray, grids: dict[int, np.ndarray], query_scale: int, query: tuple[int, int], layout: MultiScaleLayout
):
    """Overlay a query's attention at every key scale on the image, marking the query token."""
    import matplotlib.pyplot as plt

    size = image.shape[:2]
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4), squeeze=False)
    for ax, (scale, grid) in zip(axes[0], sorted(grids.items()), strict=True):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.imshow(upsample_to(grid / max(grid.max(), 1e-12), size), cmap="inferno", alpha=0.6)
        draw_windows(ax, layout, size, scale, linewidth=0.5)
        ax.set_title(f"keys at scale {scale + 1}")
        ax.set_axis_off()
    qsc = layout.scales[query_scale]
    tok_px = (size[0] / qsc.size[0], size[1] / qsc.size[1])
    for ax in axes[0]:
        ax.add_patch(
            plt.Rectangle(
                (query[1] * tok_px[1] - 0.5, query[0] * tok_px[0] - 0.5),
                tok_px[1],
                tok_px[0],
                fill=False,
                edgecolor="cyan",
                linewidth=2,
            )
        )
    fig.suptitle(f"query token {query} at scale {query_scale + 1}")
    fig.tight_layout()
    return fig


def plot_attention_view(
    pixels: np.ndarray,
    maps: AttentionMaps,
    stage: int,
    block: int,
    scale: int,
    query: tuple[int, int],
    head: int | None = None,
    kind: str = "top_down",
):
    """Where one query token attends at every key scale it reads, overlaid on the image (a matplotlib figure).

    ``pixels``: the ``(H, W, 3)`` image the maps were recorded on; the other arguments are those of
    :meth:`AttentionMaps.query`. Each panel is scaled to its own maximum; its title gives the share of the
    query's attention (one softmax over all key scales) that the scale receives.
    """
    grids = maps.query(stage, block, scale, query, head=head, kind=kind)
    fig = plot_attention(pixels, grids, scale, query, maps.layout)
    for ax, (key_scale, grid) in zip(fig.axes, sorted(grids.items()), strict=True):
        ax.set_title(f"keys at scale {key_scale + 1}: {grid.sum():.0%} of the weight")
    heads = "mean of the heads" if head is None else f"head {head + 1}"
    fig.suptitle(
        f"stage {stage + 1}, block {block + 1}, {kind.replace('_', '-')}, {heads}: "
        f"query token {query} at scale {scale + 1}"
    )
    return fig


def token_colors(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The mean colour of every token of an ``(h, w)`` = ``size`` grid over an ``(H, W, 3)`` image: ``(h, w, 3)``.

    Pixel ``y`` belongs to token row ``y * h // H`` (and likewise for columns), as in :func:`upsample_to`.
    """
    (height, width), (h, w) = pixels.shape[:2], size
    rows = ((np.arange(height) * h) // height == np.arange(h)[:, None]).astype(np.float32)  # (h, H) one-hot
    cols = ((np.arange(width) * w) // width == np.arange(w)[:, None]).astype(np.float32)  # (w, W) one-hot
    sums = np.einsum("ry,yxc,sx->rsc", rows, pixels, cols)
    return sums / np.einsum("ry,sx->rs", rows, cols)[..., None]


class AttentionExplorer:
    """An interactive view of one image's attention (ipywidgets): pick block, kind, scale, head and query token.

    The query token is set with the row/col sliders or by clicking a cell of the token grid (the image averaged
    over each token of the query scale; grids larger than ``max_cells`` per side are subsampled). Every change
    redraws :func:`plot_attention_view`. ``inputs``: the ``(1, C, H, W)`` batch the model reads; ``pixels``: the
    ``(H, W, 3)`` image in [0, 1] to draw. Put the model in eval mode first. Show it as a cell's last value.
    """

    def __init__(
        self,
        model: Atlas,
        inputs: torch.Tensor,
        pixels: np.ndarray,
        class_names: list[str] | None = None,
        max_cells: int = 32,
    ):
        import ipywidgets as widgets

        with torch.no_grad(), record_attention(model) as self.maps:
            probs = model(inputs).softmax(dim=-1)[0]
        self.pixels, self.max_cells, self.figure, self._busy = pixels, max_cells, None, False
        label = int(probs.argmax())
        name = class_names[label] if class_names else f"class {label}"
        blocks = sorted({(stage, block) for stage, block, _, _ in self.maps.keys()})
        num_heads = next(iter(self.maps.records.values())).weights.shape[2]
        self.block = widgets.Dropdown(
            options=[(f"stage {s + 1}, block {b + 1}", (s, b)) for s, b in blocks], description="block"
        )
        self.kind = widgets.ToggleButtons(description="attention")
        self.scale = widgets.Dropdown(description="query scale")
        self.head = widgets.Dropdown(
            options=[("mean", -1)] + [(str(h + 1), h) for h in range(num_heads)], description="head"
        )
        self.row, self.col = widgets.IntSlider(description="query row"), widgets.IntSlider(description="query col")
        self.grid = widgets.GridBox()
        # The figure as a picture (no output capture involved), at its own size: never stretched to the output width.
        self.view = widgets.Image(
            format="png", layout=widgets.Layout(width="auto", max_width="100%", object_fit="contain")
        )
        prediction = widgets.Label(f"prediction: {name} ({float(probs[label]):.0%})")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.block, self.kind]),
                widgets.HBox([self.scale, self.head, prediction]),
                widgets.HBox([self.grid, widgets.VBox([self.row, self.col])]),
                self.view,
            ]
        )
        self._grid_scale = None
        for control in (self.block, self.kind, self.scale, self.head, self.row, self.col):
            control.observe(self._on_change, names="value")
        self._on_change()

    def select(self, query: tuple[int, int]) -> None:
        """Query token ``(row, col)`` of the current query scale and redraw (what a click on its grid cell does)."""
        self._busy = True
        self.row.value, self.col.value = query
        self._busy = False
        self._redraw()

    def _on_change(self, _change=None) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            self._sync_controls()
        finally:
            self._busy = False
        self._redraw()

    def _sync_controls(self) -> None:
        """Offer only what the chosen block recorded: its kinds of attention, their query scales, their tokens."""
        stage, block = self.block.value
        recorded = [(kind, scale) for s, b, kind, scale in self.maps.keys() if (s, b) == (stage, block)]
        kinds = sorted({kind for kind, _ in recorded}, reverse=True)  # top_down first
        _set_options(self.kind, [(kind.replace("_", "-"), kind) for kind in kinds])
        scales = sorted(scale for kind, scale in recorded if kind == self.kind.value)
        _set_options(self.scale, [(str(scale + 1), scale) for scale in scales])
        h, w = self.maps.layout.scales[self.scale.value].size
        self.row.max, self.col.max = h - 1, w - 1
        if self._grid_scale != self.scale.value:
            self._grid_scale = self.scale.value
            self.grid.children, self.grid.layout = self._grid_cells((h, w))

    def _grid_cells(self, size: tuple[int, int]):
        """Buttons coloured like the tokens of a ``size`` grid, and the grid's layout.

        Past ``max_cells`` tokens per side, one button stands for a block of ``step x step`` tokens and selects
        the one in its middle.
        """
        import ipywidgets as widgets

        step = -(-max(size) // self.max_cells)
        rows, cols = ([min(i + step // 2, n - 1) for i in range(0, n, step)] for n in size)
        colors = token_colors(self.pixels, size)
        side = max(6, 256 // max(len(rows), len(cols)))
        cells = []
        for r in rows:
            for c in cols:
                cell = widgets.Button(
                    tooltip=f"token ({r}, {c})",
                    layout=widgets.Layout(width=f"{side}px", height=f"{side}px", margin="0px", padding="0px"),
                )
                cell.style.button_color = "#{:02x}{:02x}{:02x}".format(*(colors[r, c] * 255).round().astype(int))
                cell.on_click(lambda _, token=(r, c): self.select(token))
                cells.append(cell)
        layout = widgets.Layout(grid_template_columns=f"repeat({len(cols)}, {side}px)", grid_gap="0px")
        return cells, layout

    def _redraw(self) -> None:
        import matplotlib.pyplot as plt

        stage, block = self.block.value
        head = None if self.head.value < 0 else self.head.value
        query = (self.row.value, self.col.value)
        self.figure = plot_attention_view(
            self.pixels, self.maps, stage, block, self.scale.value, query, head, self.kind.value
        )
        png = io.BytesIO()
        self.figure.savefig(png, format="png", dpi=72)
        self.view.value = png.getvalue()
        plt.close(self.figure)

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = (
            f"attention explorer: {len(self.block.options)} blocks, {self.maps.layout.num_scales} scales, "
            f"{len(self.head.options) - 1} heads (an interactive widget: run the notebook in Jupyter to use it)"
        )
        # A static picture of the current view, for where widgets cannot run (GitHub, nbviewer, a stored notebook).
        bundle["image/png"] = base64.b64encode(self.view.value).decode("ascii")
        return bundle


def _set_options(control, options: list[tuple[str, object]]) -> None:
    """Give a selection widget new ``(label, value)`` options, keeping its value if still offered, else the first."""
    if list(control.options) == options:
        return
    values, value = [v for _, v in options], control.value
    control.options = options
    control.value = value if value in values else values[0]


@dataclass(frozen=True)
class BlockStep:
    """One step of an MSA block on one scale, for :func:`plot_msa_block`: what it does and its tensor shapes."""

    phase: str  # "position", "summarise", "top-down" or "bottom-up"
    scale: int  # the scale it updates, 1-based as in the paper (scale 1 is the finest)
    what: str  # a few words
    shapes: str  # the tensors it reads and writes, e.g. "q (B, 64, 256, C), kv (B, 64, 576, 2C)"


def _dims(*values) -> str:
    return "(" + ", ".join(str(v) for v in values) + ")"


def msa_block_steps(
    layout: MultiScaleLayout, first: int = 0, top_down: bool = True, bottom_up: bool = True, dim="C", batch="B"
) -> list[BlockStep]:
    """The steps of one MSA block over the active scales ``first ..`` of ``layout``, in the order it runs them.

    position (every scale) -> summarise (scale l into l+1, finest first) -> top-down (coarsest to finest) ->
    bottom-up (scale 2 to L of the active ones). Top-down queries are ``(B, nW_l, T_l, C)`` windows and read
    ``T_l + sum_m T_m`` keys (their own window and, with ``top_down``, the window containing it at every coarser
    scale); bottom-up queries are the ``(k/s)^2`` tokens of scale l that summarise one window of scale l-1 and
    read that window. ``dim`` and ``batch`` are printed as given (a name or a number).
    """
    scales = list(layout.scales[first:])
    two_c = f"2{dim}" if isinstance(dim, str) else 2 * dim
    steps = [
        BlockStep(
            "position",
            sc.index + 1,
            f"+ position table {_dims(*sc.window, dim)}",
            f"map {_dims(batch, *sc.size, dim)}",
        )
        for sc in scales
    ]
    for fine, coarse in zip(scales, scales[1:], strict=False):
        steps.append(
            BlockStep(
                "summarise",
                coarse.index + 1,
                f"+= maxpool{layout.pool_stride}(scale {fine.index + 1})",
                f"{_dims(batch, *fine.size, dim)} -> {_dims(batch, *coarse.size, dim)}",
            )
        )
    for l in reversed(range(len(scales))):
        sc = scales[l]
        coarser = scales[l + 1 :] if top_down else []
        keys = sc.tokens_per_window + sum(m.tokens_per_window for m in coarser)
        reads = " + ".join([f"own {sc.tokens_per_window}"] + [f"s{m.index + 1} {m.tokens_per_window}" for m in coarser])
        steps.append(
            BlockStep(
                "top-down",
                sc.index + 1,
                f"windows read {reads} keys",
                f"q {_dims(batch, sc.num_windows, sc.tokens_per_window, dim)}, "
                f"kv {_dims(batch, sc.num_windows, keys, two_c)}",
            )
        )
    if bottom_up:
        side = scales[0].window[0] // layout.pool_stride
        for finer, sc in zip(scales, scales[1:], strict=False):
            steps.append(
                BlockStep(
                    "bottom-up",
                    sc.index + 1,
                    f"{side}x{side} tokens read the scale-{finer.index + 1} window",
                    f"q {_dims(batch, finer.num_windows, side * side, dim)}, "
                    f"kv {_dims(batch, finer.num_windows, finer.tokens_per_window, two_c)}",
                )
            )
    return steps


PHASE_COLORS = {"position": "#d9d9d9", "summarise": "#fdd0a2", "top-down": "#c6dbef", "bottom-up": "#c7e9c0"}


def plot_msa_block(layout: MultiScaleLayout, first: int = 0, top_down: bool = True, bottom_up: bool = True, dim="C"):
    """ "An MSA block at a glance": one column per phase, two phases per row, one box per step with its tensor
    shapes (a figure).

    The boxes are :func:`msa_block_steps`, top to bottom in the order the block runs them; an arrow joins
    each step to the next. The title gives the image layout (token grid, ``k``, ``s``). The figure is about
    660 px wide at 72 dpi, so that its 10 pt text stays legible on a page 800 px wide.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    steps = msa_block_steps(layout, first, top_down, bottom_up, dim)
    phases = [p for p in PHASE_COLORS if any(s.phase == p for s in steps)]
    per_row = 2
    bands = [phases[i : i + per_row] for i in range(0, len(phases), per_row)]
    boxes = [max(sum(s.phase == p for s in steps) for p in band) for band in bands]  # boxes per column, per band
    width, height, gap_x, gap_y, title_room = 5.4, 1.0, 0.5, 0.45, 0.9
    band_top = [-sum(n * (height + gap_y) + title_room for n in boxes[:b]) for b in range(len(bands))]
    total_height = sum(n * (height + gap_y) + title_room for n in boxes)
    fig, ax = plt.subplots(figsize=(per_row * (width + gap_x) * 0.78, 0.8 + total_height * 0.78))
    place = {p: (b, band.index(p)) for b, band in enumerate(bands) for p in band}
    centres, row_of = [], dict.fromkeys(phases, 0)
    for step in steps:
        band, col = place[step.phase]
        row = row_of[step.phase]
        row_of[step.phase] += 1
        x, y = col * (width + gap_x), band_top[band] - row * (height + gap_y)
        ax.add_patch(
            FancyBboxPatch(
                (x, y - height), width, height, boxstyle="round,pad=0.05", facecolor=PHASE_COLORS[step.phase]
            )
        )
        ax.text(x + width / 2, y - 0.3 * height, f"scale {step.scale}: {step.what}", ha="center", va="center", size=10)
        ax.text(x + width / 2, y - 0.7 * height, step.shapes, ha="center", va="center", size=10, family="monospace")
        centres.append((x, y, band, col))
    for (x0, y0, b0, c0), (x1, y1, b1, c1) in zip(centres, centres[1:], strict=False):
        if b1 != b0:  # down to the next row of phases, clear of its phase title
            start, end = (x0 + 0.2 * width, y0 - height - 0.05), (x1 + 0.8 * width, y1 + 0.05)
        elif c1 != c0:
            start, end = (x0 + width + 0.05, y0 - height / 2), (x1 - 0.05, y1 - height / 2)
        else:
            start, end = (x0 + width / 2, y0 - height - 0.05), (x1 + width / 2, y1 + 0.05)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color="0.3"))
    for phase, (band, col) in place.items():
        x = col * (width + gap_x) + width / 2
        ax.text(x, band_top[band] + 0.35, phase, ha="center", va="bottom", size=11, weight="bold")
    ax.set_xlim(-0.2, per_row * (width + gap_x) - gap_x + 0.2)
    ax.set_ylim(-total_height + title_room + gap_y - 0.2, 0.9)
    ax.set_axis_off()
    sc = layout.scales[first]
    ax.set_title(
        f"one MSA block on a {sc.size[0]}x{sc.size[1]}-token grid: k = {layout.window_size},\n"
        f"s = {layout.pool_stride}, {layout.num_scales - first} scales (B: batch, C: channels)",
        size=10,
    )
    fig.tight_layout()
    return fig


def query_reads(layout: MultiScaleLayout, query: tuple[int, int], routing: str = "containing") -> dict[int, np.ndarray]:
    """The keys a token of scale 0 reads in top-down, per key scale: ``{scale: (h, w) bool}`` over real tokens.

    Its own window at scale 0 and, at every coarser scale, the window :class:`atlas.msa.BlockGeometry` routes its
    window to (``routing`` as in :meth:`MultiScaleLayout.containing_windows`).
    """
    geo = BlockGeometry.build(layout, 0, routing, top_down=True)
    fine = layout.scales[0]
    window = (query[0] // fine.window[0]) * fine.grid[1] + query[1] // fine.window[1]
    reads = {}
    for m, sc in enumerate(layout.scales):
        w = window if m == 0 else int(geo.top_down_windows[0, m][window])
        r, c = divmod(w, sc.grid[1])
        grid = np.zeros(sc.size, dtype=bool)
        grid[r * sc.window[0] : (r + 1) * sc.window[0], c * sc.window[1] : (c + 1) * sc.window[1]] = True
        reads[m] = grid
    return reads


def plot_query_reads(image: np.ndarray, layout: MultiScaleLayout, query: tuple[int, int], routing: str = "containing"):
    """One panel per scale: the image, darkened except where the keys of :func:`query_reads` lie (a figure)."""
    import matplotlib.pyplot as plt

    reads = query_reads(layout, query, routing)
    size = image.shape[:2]
    fig, axes = plt.subplots(1, len(reads), figsize=(4 * len(reads), 4.3), squeeze=False)
    fine = layout.scales[0]
    tok = (size[0] / fine.size[0], size[1] / fine.size[1])
    for (m, grid), ax in zip(reads.items(), axes[0], strict=True):
        sc = layout.scales[m]
        shade = upsample_to(grid.astype(np.float32), size)[..., None]
        ax.imshow(image * (0.25 + 0.75 * shade))
        draw_windows(ax, layout, size, m, linewidth=0.5)
        ax.add_patch(
            plt.Rectangle(
                (query[1] * tok[1] - 0.5, query[0] * tok[0] - 0.5), tok[1], tok[0], fill=False, color="cyan", lw=2
            )
        )
        ax.set_title(f"scale {m + 1}: {int(grid.sum())} of {sc.num_tokens} tokens", size=10)
        ax.set_axis_off()
    keys = sum(int(g.sum()) for g in reads.values())
    fig.suptitle(f"the keys of fine token {query}: {keys} of {sum(s.num_tokens for s in layout.scales)} tokens")
    fig.tight_layout()
    return fig


def label_window_reads(
    ax, image: np.ndarray, layout: MultiScaleLayout, reads: torch.Tensor, title: str, fine: int = 0, coarse: int = 1
) -> None:
    """Tint each window of scale ``fine`` over ``image`` with the colour of the window of scale ``coarse`` it reads
    (``reads``: ``(nW_fine,)`` indices, as ``MultiScaleLayout.containing_windows`` gives them), and write that
    index on it; thin lines are the windows of ``fine``, thick ones those of ``coarse``."""
    import matplotlib.pyplot as plt

    grid = layout.scales[fine].grid
    colours = plt.get_cmap("tab10")(reads.view(grid).numpy() % 10)
    ax.imshow(image)
    ax.imshow(upsample_to(colours, image.shape[:2]), alpha=0.35)
    window_px = (image.shape[0] / grid[0], image.shape[1] / grid[1])
    for i, window in enumerate(reads.tolist()):
        r, c = divmod(i, grid[1])
        ax.text(
            (c + 0.5) * window_px[1], (r + 0.5) * window_px[0], str(window), ha="center", va="center", color="white"
        )
    draw_windows(ax, layout, image.shape[:2], fine, linewidth=0.5)
    draw_windows(ax, layout, image.shape[:2], coarse, linewidth=2.5)
    ax.set_title(title)
    ax.set_axis_off()


def _oblique(x: np.ndarray, y: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Points of the unit square (y down) on the plane of pyramid level ``level``, drawn obliquely."""
    return x + 0.5 * (1 - y), 0.35 * (1 - y) + 0.8 * level


def draw_containment_tree(ax, layout: MultiScaleLayout, parents: list[torch.Tensor]) -> None:
    """The scales of ``layout`` as stacked planes with their windows (finest at the bottom), each window joined to
    its parent at the next coarser scale. ``parents[l]``: ``(nW_l,)`` the window of scale ``l + 1`` holding each
    window of scale ``l``. An edge has the colour of the window of scale 2 it leads to (that of
    :func:`label_window_reads`)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    centres = []
    for level, sc in enumerate(layout.scales):
        rows, cols = np.divmod(np.arange(sc.num_windows), sc.grid[1])
        centres.append(_oblique((cols + 0.5) / sc.grid[1], (rows + 0.5) / sc.grid[0], level))
        for t in np.linspace(0, 1, sc.grid[0] + 1):
            ax.plot(*_oblique(np.array([0, 1]), np.array([t, t]), level), color="grey", linewidth=0.6)
        for t in np.linspace(0, 1, sc.grid[1] + 1):
            ax.plot(*_oblique(np.array([t, t]), np.array([0, 1]), level), color="grey", linewidth=0.6)
        ax.scatter(*centres[level], s=8, color="black", zorder=3)
        ax.text(1.6, 0.8 * level + 0.15, f"scale {level + 1}\n{sc.grid[0]}x{sc.grid[1]} windows")
    for level, parent in enumerate(parents):
        (child_x, child_y), (parent_x, parent_y) = centres[level], centres[level + 1]
        colours = parent if level == 0 else torch.arange(len(parent))  # the scale-2 window each edge belongs to
        for child, (p, colour) in enumerate(zip(parent.tolist(), colours.tolist(), strict=True)):
            ax.plot(
                [child_x[child], parent_x[p]], [child_y[child], parent_y[p]], color=cmap(colour % 10), linewidth=0.8
            )
    ax.set_aspect("equal")
    ax.set_axis_off()


def plot_token_masks(ax, layout: MultiScaleLayout, top_down: torch.Tensor, bottom_up: torch.Tensor, title: str) -> None:
    """Dense ``(N, N)`` masks over the tokens of every scale as one picture: blue where a query (row) reads a key
    (column) top-down, orange where it reads it bottom-up.

    The masks index tokens scale by scale, finest first, row-major within a scale; the picture reorders each scale's
    tokens window by window, so that every window's keys form a block.
    """
    from matplotlib.colors import ListedColormap

    ends = np.cumsum([0] + [sc.num_tokens for sc in layout.scales])
    order = []
    for sc, start in zip(layout.scales, ends[:-1], strict=True):
        ids = torch.arange(1, sc.num_tokens + 1, dtype=torch.float64).view(1, *sc.size, 1)
        windowed = map_to_windows(ids, sc.window).flatten()  # the padding shows up as 0
        order.append(windowed[windowed > 0].long() - 1 + int(start))
    order = torch.cat(order)
    picture = (top_down.int() + 2 * bottom_up.int())[order][:, order]
    colours = ListedColormap(["white", "tab:blue", "tab:orange"])
    ax.imshow(picture.numpy(), cmap=colours, vmin=0, vmax=2, interpolation="nearest")
    for start in ends[1:-1]:
        ax.axhline(start - 0.5, color="grey", linewidth=0.6)
        ax.axvline(start - 0.5, color="grey", linewidth=0.6)
    ticks = [(a + b) / 2 - 0.5 for a, b in zip(ends[:-1], ends[1:], strict=True)]
    labels = [str(l + 1) for l in range(layout.num_scales)]
    ax.set_xticks(ticks, labels)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("scale of the key")
    ax.set_ylabel("scale of the query")
    ax.set_title(f"{title}\n{(top_down | bottom_up).float().mean():.1%} of query-key pairs", fontsize=10)
