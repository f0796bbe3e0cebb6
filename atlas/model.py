"""Atlas (the paper's Algorithm 2): stem -> scales -> one stage per scale, dropping the finest -> readout.

The named models are registered with timm, so that after ``import atlas``::

    timm.create_model("atlas_base_patch16", img_size=1024, num_classes=100, drop_path_rate=0.3)

``composition`` chooses how MSA blocks are put together (the paper's Table 5); Atlas is the default:

* ``"atlas"``: one stage per scale; after stage ``i`` the finest scale is dropped; readout from the coarsest.
* ``"stack"``: one stage of ``depths[0]`` blocks over every scale, nothing dropped; the readout averages the
  scales (Tables 3-5: "no down-sampling, average scales for readout").
* ``"conv_downsample"``: stages at halving resolution, as in hierarchical backbones: after each stage a
  LayerNorm and a strided 3x3 convolution halve the finest map, and the next stage rebuilds its scales from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .msa import ATTENTION_KERNELS, BlockGeometry, MSABlock
from .scales import ROUTINGS, MultiScaleLayout, build_pyramid, image_to_map, map_to_image, map_to_tokens
from .stem import MEMORY_FORMATS, ConvStem, Downsample, check_memory_format

# Blocks per stage, by number of scales. Two scales (1024px) is the paper's "D2D10"; three scales
# (2048px, 4096px) is our choice, the paper does not state it.
DEPTHS_BASE = {1: (12,), 2: (2, 10), 3: (2, 2, 8), 4: (2, 2, 2, 6)}
DEPTHS_TINY = {1: (6,), 2: (2, 4), 3: (2, 2, 2), 4: (1, 1, 2, 2)}
GLOBAL_POOLS = ("avg", "")
COMPOSITIONS = ("atlas", "stack", "conv_downsample")
READOUTS = ("coarsest", "all_scales")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class AtlasConfig:
    """Everything that defines an Atlas model. ``depths=None`` picks ``depths_by_scales[num_scales]``."""

    img_size: tuple[int, int] = (1024, 1024)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    num_heads: int = 12
    stem_width: int = 192
    stem_depth: int = 3  # residual blocks in each of the stem's two stages (FasterViT's and the paper's: 3)
    mlp_ratio: float = 4.0
    patch_size: int = 16
    window_size: int = 16
    pool_stride: int = 4
    depths: tuple[int, ...] | None = None
    depths_by_scales: dict[int, tuple[int, ...]] = field(default_factory=lambda: dict(DEPTHS_BASE))
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    multiscale: bool = True
    top_down: bool = True
    bottom_up: bool = True
    routing: str = "containing"
    memory_format: str = "auto"  # the stem's: "auto", "channels_last" or "contiguous" (see atlas/stem.py)
    attention: str = "sdpa"  # top-down kernel: "sdpa" (windows, any device) or "flex" (FlexAttention, CUDA training)
    global_pool: str = "avg"  # readout: "avg" (mean over the readout tokens) or "" (every token)
    composition: str = "atlas"  # "atlas", "stack" or "conv_downsample" (see the module docstring)
    readout: str | None = None  # "coarsest" or "all_scales" of the last stage; None: "all_scales" for a stack

    def __post_init__(self):
        self.check_types()
        problems = []
        if len(self.img_size) != 2 or min(self.img_size) < self.patch_size:
            problems.append(f"img_size must be (H, W) with both sides >= patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.embed_dim != 4 * self.stem_width:
            problems.append(f"embed_dim {self.embed_dim} must be 4 * stem_width ({4 * self.stem_width})")
        if self.pool_stride < 2 or self.window_size % self.pool_stride:
            problems.append(
                f"window_size {self.window_size} must be a multiple of pool_stride {self.pool_stride} (>= 2)"
            )
        if self.routing not in ROUTINGS:
            problems.append(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.global_pool not in GLOBAL_POOLS:
            problems.append(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.composition not in COMPOSITIONS:
            problems.append(f"composition must be one of {COMPOSITIONS}, got {self.composition!r}")
        if self.readout is None:
            self.readout = "all_scales" if self.composition == "stack" else "coarsest"
        if self.readout not in READOUTS:
            problems.append(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.attention not in ATTENTION_KERNELS:
            problems.append(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        elif self.attention == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            problems.append(f"attention='flex' needs FlexAttention (torch >= 2.5); this is torch {torch.__version__}")
        try:
            check_memory_format(self.memory_format)
        except ValueError as error:
            problems.append(str(error))
        if not 0.0 <= self.drop_path_rate < 1.0:
            problems.append(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.stem_depth < 0:
            problems.append(f"stem_depth must be >= 0 residual blocks per stem stage, got {self.stem_depth}")
        if self.in_chans < 1 or self.num_classes < 0:
            problems.append(f"in_chans must be >= 1 and num_classes >= 0, got {self.in_chans}, {self.num_classes}")
        if problems:
            raise ValueError("invalid Atlas config: " + "; ".join(problems))
        if self.depths is None:
            self.depths = self.default_depths()
        self.depths = tuple(self.depths)
        self.check_composition()

    def warn_if_window_exceeds_image(self) -> None:
        """A UserWarning when ``window_size`` is larger than the token grid: the model then has one scale, a single
        window of global attention. :meth:`from_kwargs` calls it when ``window_size`` was asked for; a small
        image at the default window is a deliberate single-scale model (the notebooks build such models)."""
        tokens = self.token_size(self.img_size)
        if self.multiscale and self.window_size > max(tokens):
            warnings.warn(
                f"window_size {self.window_size} is larger than the {tokens[0]}x{tokens[1]} token grid of img_size "
                f"{self.img_size} (patch_size {self.patch_size}): the model has one scale, a single window of "
                f"global attention. For several scales use a larger img_size, or a window_size below {max(tokens)} "
                f"(a multiple of pool_stride {self.pool_stride})",
                stacklevel=3,
            )

    INT_FIELDS = ("in_chans", "num_classes", "embed_dim", "num_heads", "stem_width", "stem_depth", "patch_size")
    POSITIVE_FIELDS = ("embed_dim", "num_heads", "stem_width", "patch_size", "window_size")

    def check_types(self) -> None:
        """TypeError for a field of the wrong type (``img_size='64'``), ValueError for a size of zero; ``img_size``
        as an ``(H, W)`` tuple of ints."""
        size = self.img_size
        if _is_int(size):
            size = (size, size)
        if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(side) for side in size)):
            raise TypeError(f"img_size must be an int or (H, W) of ints, got {self.img_size!r}")
        self.img_size = tuple(int(side) for side in size)
        for name in (*self.INT_FIELDS, "window_size", "pool_stride"):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        if not isinstance(self.mlp_ratio, numbers.Real) or isinstance(self.mlp_ratio, bool):
            raise TypeError(f"mlp_ratio must be a number, got {self.mlp_ratio!r}")
        for name in self.POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"invalid Atlas config: {name} must be >= 1, got {getattr(self, name)}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"invalid Atlas config: mlp_ratio must be > 0, got {self.mlp_ratio}")

    def default_depths(self) -> tuple[int, ...]:
        """Atlas: ``depths_by_scales[num_scales]``; a stack: as many blocks in one stage; conv: (3, 3, 3, 3)."""
        if self.composition == "conv_downsample":
            return (3, 3, 3, 3)  # the paper's Table 5 row
        n = self.layout.num_scales
        if n not in self.depths_by_scales:
            raise ValueError(
                f"img_size {self.img_size} gives {n} scales; default depths exist for "
                f"{sorted(self.depths_by_scales)} scales: pass depths=(d_1, ..., d_{n})"
            )
        depths = self.depths_by_scales[n]
        return (sum(depths),) if self.composition == "stack" else depths

    def check_composition(self) -> None:
        """Depths that fit the composition, and no scale whose last update nothing would read."""
        n = self.layout.num_scales
        if min(self.depths, default=0) < 1:
            raise ValueError(f"depths {self.depths} must give >= 1 block to every stage")
        if self.composition == "atlas" and len(self.depths) != n:
            raise ValueError(
                f"depths {self.depths} must give >= 1 block for each of the {n} scales of img_size {self.img_size}"
            )
        if self.composition == "stack":
            if len(self.depths) != 1:
                raise ValueError(f"composition 'stack' runs one stage over all scales: depths=(d,), got {self.depths}")
            if self.readout == "coarsest" and n > 1 and not self.bottom_up:
                raise ValueError(
                    "readout 'coarsest' of a stack without bottom_up never reads the finer scales' last update "
                    "(their weights would get no gradient): use readout='all_scales' or bottom_up=True"
                )
        if self.composition == "conv_downsample" and self.multiscale and not self.top_down:
            raise ValueError(
                "composition 'conv_downsample' carries only the finest scale to the next stage, which without "
                "top_down never reads the coarse scales: use top_down=True or multiscale=False"
            )

    @classmethod
    def from_kwargs(cls, **kwargs) -> AtlasConfig:
        """Like ``AtlasConfig(**kwargs)`` but an unknown key is a ValueError naming the closest valid one, and a
        ``window_size`` larger than the image a warning."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown Atlas config key {key!r}{hint}; valid keys: {', '.join(names)}")
        config = cls(**kwargs)
        if "window_size" in kwargs:
            config.warn_if_window_exceeds_image()
        return config

    def token_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid of an image: each strided convolution of the stem rounds up."""
        return (math.ceil(image_size[0] / self.patch_size), math.ceil(image_size[1] / self.patch_size))

    def layout_for(self, image_size: tuple[int, int]) -> MultiScaleLayout:
        return MultiScaleLayout(self.token_size(image_size), self.window_size, self.pool_stride, self.multiscale)

    @property
    def layout(self) -> MultiScaleLayout:
        return self.layout_for(self.img_size)

    def stage_plan(self, image_size: tuple[int, int]) -> list[tuple[MultiScaleLayout, int]]:
        """Per stage, the layout it runs on and the first scale of it that it updates."""
        layout = self.layout_for(image_size)
        if self.composition == "atlas":
            return [(layout, i) for i in range(len(self.depths))]
        if self.composition == "stack":
            return [(layout, 0)]
        plan, (h, w) = [], layout.token_size
        for _ in self.depths:
            plan.append((MultiScaleLayout((h, w), self.window_size, self.pool_stride, self.multiscale), 0))
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return plan

    def feature_sources(self) -> list[tuple[int, int, int]]:
        """Per backbone feature, finest first: (stage, local scale index, stride in pixels).

        Atlas: scale ``i`` after stage ``i``, the last stage that updates it. Stack: every scale after the one
        stage. Conv down-sampling: the finest map of each stage.
        """
        if self.composition == "stack":
            return [(0, l, self.patch_size * self.pool_stride**l) for l in range(self.layout.num_scales)]
        if self.composition == "conv_downsample":
            return [(i, 0, self.patch_size * 2**i) for i in range(len(self.depths))]
        return [(i, 0, self.patch_size * self.pool_stride**i) for i in range(len(self.depths))]


class AtlasStage(nn.Module):
    """``depth`` MSA blocks over ``num_scales`` scales; ``hand_over`` says what the next stage reads of them.

    ``"coarse"``: the scales but the finest (Atlas drops it); ``"finest"``: the finest map alone, halved by
    ``downsample`` (conv down-sampling); None: the last stage, read out. The last block skips the updates that
    nothing would read (distributed training would otherwise wait for their weights' gradients): without
    bottom-up, that of the scale Atlas drops next; before conv down-sampling, the bottom-up pass.
    """

    def __init__(self, config: AtlasConfig, num_scales: int, drop_path_rates: list[float], hand_over: str | None):
        super().__init__()
        last = len(drop_path_rates) - 1
        self.blocks = nn.ModuleList(
            MSABlock(
                config.embed_dim,
                config.num_heads,
                num_scales,
                config.mlp_ratio,
                rate,
                config.top_down,
                config.bottom_up and not (j == last and hand_over == "finest"),
                update_finest=not (j == last and hand_over == "coarse" and not config.bottom_up),
            )
            for j, rate in enumerate(drop_path_rates)
        )
        self.downsample = Downsample(config.embed_dim, config.embed_dim, 2) if hand_over == "finest" else None
        self.grad_checkpointing = False

    def forward(self, maps: list[torch.Tensor], geo: BlockGeometry) -> list[torch.Tensor]:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                maps = checkpoint(block, maps, geo, use_reentrant=False)
            else:
                maps = block(maps, geo)
        return maps


class Atlas(nn.Module):
    """Atlas: ``(B, in_chans, H, W)`` images -> ``(B, num_classes)`` logits.

    Build with a config, ``Atlas(AtlasConfig(...))``, or with its fields, ``Atlas(embed_dim=384, ...)``.
    The model accepts any input size with as many scales as it was built for (``img_size`` decides that).
    """

    GEOMETRY_CACHE_SIZE = 8  # input sizes whose geometry (window indices, masks) is kept per device

    def __init__(self, config: AtlasConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = AtlasConfig.from_kwargs(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = self.embed_dim = config.embed_dim
        self.stem = ConvStem(
            config.in_chans, config.stem_width, config.patch_size, config.stem_depth, config.memory_format
        )
        plan = config.stage_plan(config.img_size)
        hand_over = {"atlas": "coarse", "stack": None, "conv_downsample": "finest"}[config.composition]
        self.stages = nn.ModuleList(
            AtlasStage(
                config,
                layout.num_scales - first,
                [config.drop_path_rate * j / max(d - 1, 1) for j in range(d)],
                hand_over if i < len(plan) - 1 else None,
            )
            for i, (d, (layout, first)) in enumerate(zip(config.depths, plan, strict=True))
        )
        self.readout_norm = nn.LayerNorm(config.embed_dim)
        self.fc_norm = nn.LayerNorm(config.embed_dim)
        self.head_drop = nn.Dropout(config.drop_rate)
        self.head = nn.Linear(config.embed_dim, config.num_classes) if config.num_classes else nn.Identity()
        self.global_pool = config.global_pool
        self._geometry: dict[tuple, list[BlockGeometry]] = {}
        # Atlas: feature i is scale i after stage i, its last stage (the next one drops it); stride 16 * 4^i.
        self.feature_info = [
            dict(num_chs=config.embed_dim, reduction=stride, module=f"stages.{stage}")
            for stage, _, stride in config.feature_sources()
        ]

    # -- the forward pass, top to bottom ------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> list[tuple[MultiScaleLayout, int]]:
        """Validate a ``(B, C, H, W)`` batch and return its stage plan (:meth:`AtlasConfig.stage_plan`)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"expected a torch.Tensor of images (B, {cfg.in_chans}, H, W), got {type(x).__module__}."
                f"{type(x).__qualname__}; convert it with torch.as_tensor"
            )
        self.check_input_dtype(x)
        if x.ndim != 4 or x.shape[1] != cfg.in_chans:
            raise ValueError(
                f"expected images of shape (B, {cfg.in_chans}, H, W) for in_chans={cfg.in_chans}, "
                f"got {tuple(x.shape)}; build the model with in_chans={x.shape[1] if x.ndim == 4 else '?'} "
                "for other channel counts"
            )
        if x.shape[0] == 0:
            raise ValueError(f"got an empty batch {tuple(x.shape)}: pass at least one image")
        size = tuple(x.shape[-2:])
        if min(size) < cfg.patch_size:
            raise ValueError(
                f"image {size[0]}x{size[1]} is smaller than one {cfg.patch_size}x{cfg.patch_size} patch; "
                f"both sides must be >= {cfg.patch_size}"
            )
        plan = cfg.stage_plan(size)
        got = [layout.num_scales - first for layout, first in plan[: len(self.stages)]]
        built = [len(stage.blocks[0].scales) for stage in self.stages]
        if got != built:
            per_stage = cfg.composition == "conv_downsample"
            got, built = (got, built) if per_stage else (got[0], built[0])
            raise ValueError(
                f"image {size[0]}x{size[1]} gives {got} scales{' per stage' if per_stage else ''} but this model "
                f"was built for {built} (img_size={cfg.img_size}); feed sizes with {built} scales or "
                f"build the model with img_size={size}"
            )
        return plan

    def check_input_dtype(self, x: torch.Tensor) -> None:
        """TypeError unless ``x`` holds floating-point images in the weights' dtype (under autocast, any dtype
        it casts: float32, float16, bfloat16)."""
        dtype = next(self.parameters()).dtype
        if x.dtype == dtype:
            return
        castable = (torch.float32, torch.float16, torch.bfloat16)
        device = x.device.type  # autocast knows real devices only (not "meta", on which FLOPs are counted)
        autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and x.dtype in castable
        if not autocast:
            data = getattr(self, "pretrained_cfg", None) or _cfg()
            raise TypeError(
                f"expected floating-point images in {dtype} (the weights' dtype), got {x.dtype}: convert with "
                f"x.to({dtype}), pixels scaled to [0, 1] and normalised with mean {tuple(data['mean'])} and std "
                f"{tuple(data['std'])} (the model's data config)"
            )

    def geometry(self, plan: list[tuple[MultiScaleLayout, int]], device: torch.device) -> list[BlockGeometry]:
        """Each stage's :class:`BlockGeometry` for a stage plan, built on ``device`` once per input size and kept.

        While ``torch.compile`` traces, a geometry not yet kept is built inside the graph and not stored: storing
        it would change what the compiled graph's guards saw, and the next call would compile a second graph.
        """
        cfg = self.config
        key = (plan[0][0].token_size, str(device), cfg.routing, cfg.top_down, cfg.attention)
        if key in self._geometry:
            return self._geometry[key]
        geometry = [
            BlockGeometry.build(layout, first, cfg.routing, cfg.top_down, device, cfg.attention)
            for layout, first in plan
        ]
        if not torch.compiler.is_compiling():
            if len(self._geometry) >= self.GEOMETRY_CACHE_SIZE:
                self._geometry.pop(next(iter(self._geometry)))  # the oldest input size
            self._geometry[key] = geometry
        return geometry

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_geometry": {}}  # caches stay behind (FlexAttention masks hold closures)

    def forward_stages(
        self, x: torch.Tensor, num_stages: int | None = None
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Images -> (stem output ``(B, C, h, w)``, per stage the list of its ``(B, h_l, w_l, C)`` maps).

        ``num_stages`` runs only the first stages (all by default).
        """
        plan = self.check_input(x)
        stem_bchw = self.stem(x)
        geometry = self.geometry(plan, x.device)
        maps = build_pyramid(image_to_map(stem_bchw), plan[0][0])
        outputs = []
        stages = self.stages[:num_stages]
        memory_format = MEMORY_FORMATS[self.stem.resolved_memory_format(x.device)]  # of conv down-sampling
        for i, stage in enumerate(stages):
            maps = stage(maps, geometry[i])
            outputs.append(maps)
            if i == len(stages) - 1:
                break
            if stage.downsample is not None:  # conv down-sampling: the halved finest map, and its scales
                halved_bchw = stage.downsample(map_to_image(maps[0]), memory_format)
                maps = build_pyramid(image_to_map(halved_bchw), plan[i + 1][0])
            else:
                maps = maps[1:]  # Atlas: progressive scale dropping
        return stem_bchw, outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> ``(B, N, C)`` readout tokens (:meth:`readout_tokens` of the last stage's maps)."""
        return self.readout_tokens(self.forward_stages(x)[1][-1])

    def readout_tokens(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """A stage's maps -> ``(B, N, C)``: the coarsest scale's tokens, or (``readout="all_scales"``) those of
        every scale, concatenated finest first, so that their mean weighs each token alike (as the released
        implementation averages the scales it reads out)."""
        readout_maps = maps if self.config.readout == "all_scales" else maps[-1:]
        return torch.cat([map_to_tokens(x_map) for x_map in readout_maps], dim=1)

    def forward_head(self, tokens_bnc: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, N, C)`` tokens -> LayerNorm, mean over tokens (``global_pool="avg"``), LayerNorm, (dropout, Linear).

        With ``global_pool=""`` every token is kept: ``(B, N, C)`` features or ``(B, N, classes)`` logits.
        """
        tokens_bnc = self.readout_norm(tokens_bnc)
        pooled = self.fc_norm(tokens_bnc.mean(dim=1) if self.global_pool == "avg" else tokens_bnc)
        return pooled if pre_logits else self.head(self.head_drop(pooled))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the per-scale maps a detection or segmentation head reads.

        Intermediate ``i`` is feature ``i`` of :meth:`AtlasConfig.feature_sources` (Atlas: scale ``i`` after
        stage ``i``, the last stage that updates it): ``(B, C, h_i, w_i)`` (``output_fmt="NCHW"``) or
        ``(B, h_i, w_i, C)`` (``"NHWC"``), ``h_i = ceil(H / stride_i)`` for any input size, padded or not (see
        ``feature_info``). ``indices``: the last n if an int, all if None, or a list. ``norm`` applies
        ``readout_norm``. Returns the intermediates, or ``(forward_features(x), intermediates)``.

        With ``bottom_up=False`` the last block of a stage that hands over to the next leaves the scale it drops
        as it is after its position embedding (no coarse token reads that scale's update), so feature ``i`` then
        has the updates of stage ``i``'s other blocks and only the position embedding of its last.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        sources = self.config.feature_sources()
        take, max_index = feature_take_indices(len(sources), indices)
        last = sources[max_index][0] if stop_early or intermediates_only else len(self.stages) - 1
        _, outputs = self.forward_stages(x, num_stages=last + 1)
        features = [outputs[stage][scale] for stage, scale, _ in (sources[i] for i in take)]
        features = [self.readout_norm(f) for f in features] if norm else features
        intermediates = [map_to_image(f) for f in features] if output_fmt == "NCHW" else features
        if intermediates_only:
            return intermediates
        return self.readout_tokens(outputs[-1]), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last feature in ``indices`` (and the classifier): returns the indices kept."""
        sources = self.config.feature_sources()
        take, max_index = feature_take_indices(len(sources), indices)
        self.stages = self.stages[: sources[max_index][0] + 1]
        self.stages[-1].downsample = None  # nothing follows it now
        if prune_norm:
            self.readout_norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- what timm and training scripts expect of a backbone ------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = self.config.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay beyond norms and biases (which timm's optimizer factory
        already leaves out): none; Atlas has no position table or class token, its position MLPs are decayed."""
        return set()

    def fuse_for_inference(self) -> Atlas:
        """Eval mode with the stem's batch norms folded into its convolutions (faster, same outputs); ``self``."""
        self.eval()
        self.stem.fuse_batchnorm()
        return self

    def set_memory_format(self, memory_format: str) -> Atlas:
        """The stem's memory format: "auto" (per device), "channels_last" or "contiguous"; returns ``self``.

        Outputs do not change (up to float rounding); speed does, by device (``atlas/stem.py``).
        """
        self.config.memory_format = self.stem.memory_format = check_memory_format(memory_format)
        return self

    def compile_regions(self, **compile_kwargs) -> Atlas:
        """``torch.compile`` each unit of the stem and each MSA block on its own, in place; returns ``self``.

        Units of the same class and shapes share one compiled graph (their weights are its inputs), so the model
        compiles a few distinct graphs instead of one as deep as the model: a fraction of the first step's time
        of ``torch.compile(model)``. What joins them (scales, gradient checkpointing) stays eager. Shapes are
        static (``dynamic=False`` unless given): the stages feed one block class maps of several sizes, and
        compiling it again for shapes of any size (the compiler's reaction to a second size) took minutes.
        """
        compile_kwargs.setdefault("dynamic", False)
        for unit in (*self.stem.units(), *(block for stage in self.stages for block in stage.blocks)):
            unit.compile(**compile_kwargs)
        return self

    def set_grad_checkpointing(self, enable: bool = True, stem: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them: every MSA block and, with
        ``stem``, every stem unit (at 1024px and above the stem holds most of the saved activations)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable
        self.stem.grad_checkpointing = enable and stem

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)"}


def checkpoint_filter_fn(state_dict: dict, model: Atlas) -> dict:
    """Accept our own state dicts and the released implementation's (converted by :mod:`atlas.convert`)."""
    from .convert import convert_released_state_dict, is_released_state_dict

    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    return convert_released_state_dict(state_dict) if is_released_state_dict(state_dict) else state_dict


def _cfg(**kwargs) -> dict:
    return {
        "num_classes": 100,
        "input_size": (3, 1024, 1024),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.embed.0",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


default_cfgs = {
    "atlas_tiny_patch16": _cfg(input_size=(3, 256, 256)),
    "atlas_small_patch16": _cfg(),
    "atlas_base_patch16": _cfg(),
}

MODEL_ARGS = {
    "atlas_tiny_patch16": dict(embed_dim=192, num_heads=3, stem_width=48, depths_by_scales=DEPTHS_TINY),
    "atlas_small_patch16": dict(embed_dim=384, num_heads=6, stem_width=96),
    "atlas_base_patch16": dict(embed_dim=768, num_heads=12, stem_width=192),
}


def _create_atlas(variant: str, pretrained: bool = False, **kwargs) -> Atlas:
    kwargs.setdefault("img_size", default_cfgs[variant]["input_size"][1:])
    kwargs.setdefault("num_classes", default_cfgs[variant]["num_classes"])
    kwargs = {**MODEL_ARGS[variant], **kwargs}
    fields = {f.name for f in dataclasses.fields(AtlasConfig)}
    config = AtlasConfig.from_kwargs(**{k: v for k, v in kwargs.items() if k in fields})  # timm adds other keys
    model = build_model_with_cfg(
        Atlas,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(len(config.feature_sources())))),  # all
        **kwargs,
    )
    # The data config of the size the model was built for (timm would report the registered one).
    model.pretrained_cfg = model.default_cfg = {
        **model.pretrained_cfg,
        "input_size": (config.in_chans, *config.img_size),
    }
    return model


@register_model
def atlas_tiny_patch16(pretrained: bool = False, **kwargs) -> Atlas:
    """Atlas-T/16 (C=192, 3 heads, stem width 48): ours, small enough to train on a CPU."""
    return _create_atlas("atlas_tiny_patch16", pretrained, **kwargs)


@register_model
def atlas_small_patch16(pretrained: bool = False, **kwargs) -> Atlas:
    """Atlas-S/16 (C=384, 6 heads, stem width 96), the paper's Table 2 model."""
    return _create_atlas("atlas_small_patch16", pretrained, **kwargs)


@register_model
def atlas_base_patch16(pretrained: bool = False, **kwargs) -> Atlas:
    """Atlas-B/16 (C=768, 12 heads, stem width 192), the paper's Table 1 model."""
    return _create_atlas("atlas_base_patch16", pretrained, **kwargs)
