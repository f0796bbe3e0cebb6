"""MambaVision (Hatamizadeh & Kautz 2024, arXiv:2407.08083): its mixer, with a selective scan in plain PyTorch.

The selective scan of Mamba (Gu & Dao 2023, arXiv:2312.00752, Eq. 2a-2b with the zero-order hold of
Eq. 4) runs per channel ``d`` with a diagonal state of size ``n``::

    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t        y_t = C_t . h_t + D u_t

:func:`selective_scan` evaluates it chunk by chunk: inside a chunk of ``T`` steps every state is a sum over
the chunk's inputs weighted by the decay between the two steps (a ``T x T`` matrix per channel and state), and
the last state carries over to the next chunk. It runs anywhere; with the ``mamba_ssm`` package installed
(``pip install -e '.[mamba]'``) CUDA tensors go through its fused kernel instead.

:class:`MambaVisionMixer` is MambaVision's mixer (its Fig. 3): the input is projected and split into two
halves; one goes through a convolution, SiLU and the selective scan, the other through a convolution and
SiLU only (no scan); their concatenation is projected back. The convolutions are not causal, as in
MambaVision. Written from the paper and checked against the authors' code (NVlabs/MambaVision), which it
follows where the paper is silent: ``dt_proj``'s bias is added twice (by the layer, then again inside the
softplus; Mamba adds it once), and ``dt_proj`` starts from the models' truncated-normal init with a zero bias
(the authors' model-level init overwrites Mamba's initialisation of ``dt_proj`` in the same way). It differs
in needing no fused kernels: their code imports ``mamba_ssm``'s, which only run on CUDA.

:class:`MambaVision` is the hierarchical model: a two-convolution stem (stride 4), two stages of residual
convolution blocks, two stages of windowed blocks whose first half mix with the mixer and second half with
self-attention, a strided convolution between stages, BatchNorm and mean pooling before the head. The
windowed blocks are timm's ``Block`` with the mixer or timm's attention, so parameters line up with the
authors' (MambaVision-S 50.1M, -B 97.7M at 1000 classes, as their README reports). It takes any input size;
windows that do not fit are zero-padded, as in the authors' code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from timm.layers import DropPath
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.vision_transformer import Attention, Block, VisionTransformer, init_weights_vit_timm
from torch import nn

from .common import pretrained_cfg

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except ImportError:  # the optional CUDA kernel: pip install -e '.[mamba]'
    selective_scan_fn = None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    chunk_size: int = 8,
) -> torch.Tensor:
    """Mamba's selective scan with ``delta = softplus(delta + delta_bias)``: ``y`` ``(b, d, l)``.

    ``u, delta``: ``(b, d, l)``; ``A``: ``(d, n)`` (negative); ``B, C``: ``(b, n, l)``; ``D, delta_bias``: ``(d,)``.
    Memory grows with ``chunk_size`` (the ``T x T`` decays per chunk), Python steps shrink with it.
    """
    if selective_scan_fn is not None and u.is_cuda:
        return selective_scan_fn(u, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=True)
    dtype = torch.promote_types(u.dtype, torch.float32)  # the recurrence in float32 at least, as the kernel
    u, delta, A, B, C, D, delta_bias = (t.to(dtype) for t in (u, delta, A, B, C, D, delta_bias))
    delta = F.softplus(delta + delta_bias[:, None])
    log_decay = einsum(delta, A, "b d l, d n -> b d n l")  # log exp(delta_t A) <= 0
    inputs = einsum(delta * u, B, "b d l, b n l -> b d n l")  # delta_t B_t u_t
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, d, n)
    ys = []
    for start in range(0, u.shape[-1], chunk_size):
        chunk = slice(start, start + chunk_size)
        total = log_decay[..., chunk].cumsum(-1)  # (b, d, n, T): log decay from the chunk's start to step t
        steps = total.shape[-1]
        later = torch.ones(steps, steps, dtype=torch.bool, device=u.device).triu(1)  # s > t
        # decay[t, s] = prod_{s < k <= t} exp(delta_k A), zero for s > t (masked before exp: no overflow)
        decay = (total[..., :, None] - total[..., None, :]).masked_fill(later, float("-inf")).exp()
        states = (decay @ inputs[..., chunk, None]).squeeze(-1) + total.exp() * state[..., None]  # (b, d, n, T)
        ys.append(einsum(states, C[:, :, chunk], "b d n t, b n t -> b d t"))
        state = states[..., -1]
    return torch.cat(ys, dim=2) + D[:, None] * u


class MambaVisionMixer(nn.Module):
    """MambaVision's mixer, ``(B, L, C) -> (B, L, C)``, with timm's attention-layer interface.

    The options timm's ``Block`` passes to an attention layer (``num_heads``, ``qkv_bias``, ...) do not apply to
    a mixer and are ignored. MambaVision's setting: state size 8, convolution width 3, expansion 1.
    """

    def __init__(self, dim: int, d_state: int = 8, d_conv: int = 3, expand: int = 1, **attention_options):
        super().__init__()
        inner = expand * dim
        if inner % 2:
            raise ValueError(f"MambaVisionMixer splits expand * dim = {inner} channels in two halves: make it even")
        half = inner // 2
        self.dt_rank = math.ceil(dim / 16)
        self.d_state = d_state
        self.in_proj = nn.Linear(dim, inner, bias=False)
        self.conv_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.conv_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("MambaVisionMixer takes no attn_mask and is not causal")
        x, z = rearrange(self.in_proj(x), "b l (two d) -> two b d l", two=2)
        x, z = F.silu(self.conv_x(x)), F.silu(self.conv_z(z))
        dt, B, C = self.x_proj(rearrange(x, "b d l -> b l d")).split([self.dt_rank, self.d_state, self.d_state], -1)
        delta = rearrange(self.dt_proj(dt), "b l d -> b d l")  # with its bias, which the scan adds again
        B, C = rearrange(B, "b l n -> b n l"), rearrange(C, "b l n -> b n l")
        y = selective_scan(x, delta, -torch.exp(self.A_log.float()), B, C, self.D.float(), self.dt_proj.bias.float())
        return self.out_proj(rearrange(torch.cat([y.to(z.dtype), z], dim=1), "b d l -> b l d"))


class ConvBlock(nn.Module):
    """MambaVision's residual block of its first two stages: ``x + BN(conv(GELU(BN(conv(x)))))`` on ``(B, C, H, W)``."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.BatchNorm2d(dim),
            nn.GELU(approximate="tanh"),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.BatchNorm2d(dim),
        )
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.body(x))


class WindowStage(nn.Module):
    """Blocks over non-overlapping ``window x window`` windows of ``(B, C, H, W)``: mixers first, then attention."""

    def __init__(self, dim, depth, num_heads, window, drop_paths: Sequence[float], layer_scale: float | None):
        super().__init__()
        self.window = window
        first_attention = depth // 2 + depth % 2  # MambaVision: the last depth // 2 blocks attend
        self.blocks = nn.Sequential(
            *(
                Block(
                    dim,
                    num_heads,
                    qkv_bias=True,
                    init_values=layer_scale,
                    drop_path=drop_paths[i],
                    norm_layer=nn.LayerNorm,
                    attn_layer=Attention if i >= first_attention else MambaVisionMixer,
                )
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, k = x.shape[2], x.shape[3], self.window
        x = F.pad(x, (0, -w % k, 0, -h % k))
        rows, cols = x.shape[2] // k, x.shape[3] // k
        windows = self.blocks(rearrange(x, "b c (m p) (n q) -> (b m n) (p q) c", p=k, q=k))
        return rearrange(windows, "(b m n) (p q) c -> b c (m p) (n q)", m=rows, n=cols, p=k)[:, :, :h, :w]


class MambaVision(nn.Module):
    """MambaVision on images ``(B, 3, H, W)`` of any size -> logits ``(B, num_classes)``."""

    def __init__(
        self,
        dim: int = 96,
        depths: Sequence[int] = (3, 3, 7, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_size: Sequence[int] = (8, 8, 14, 7),
        stem_dim: int = 64,
        layer_scale: float | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4 or len(window_size) != 4:
            raise ValueError("MambaVision has 4 stages: depths, num_heads and window_size need 4 values each")
        self.num_classes = num_classes
        self.num_features = dim * 8
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(stem_dim, dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages = []
        for i, depth in enumerate(depths):
            width, drops = dim * 2**i, rates[sum(depths[:i]) : sum(depths[: i + 1])]
            if i < 2:
                stage = nn.Sequential(*(ConvBlock(width, p) for p in drops))
            else:
                stage = WindowStage(width, depth, num_heads[i], window_size[i], drops, layer_scale)
            stages.append(stage)
            if i < 3:
                stages.append(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.grad_checkpointing = False
        self.apply(init_weights_vit_timm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in the backward pass (for 2048px and more)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = checkpoint_seq(self.stages, x) if self.grad_checkpointing and torch.is_grad_enabled() else self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {
        "mambavision_small": pretrained_cfg("stem.0"),
        "mambavision_base": pretrained_cfg("stem.0"),
        "vit_mambavision_mixer_base_patch16": pretrained_cfg(),
    }
)


@register_model
def mambavision_small(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-S (C=96, depths 3-3-7-5, windows 8-8-14-7), the authors' MambaVision-S (no weights)."""
    return build_model_with_cfg(MambaVision, "mambavision_small", pretrained, **kwargs)


@register_model
def mambavision_base(pretrained: bool = False, **kwargs) -> MambaVision:
    """MambaVision-B (C=128, depths 3-3-10-5, layer scale 1e-5), the authors' MambaVision-B (no weights)."""
    args = dict(dim=128, depths=(3, 3, 10, 5), layer_scale=1e-5)
    return build_model_with_cfg(MambaVision, "mambavision_base", pretrained, **{**args, **kwargs})


@register_model
def vit_mambavision_mixer_base_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 with MambaVision's mixer in place of attention over all tokens, mean-pooled (Table 3's block)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False, global_pool="avg")
    return build_model_with_cfg(
        VisionTransformer,
        "vit_mambavision_mixer_base_patch16",
        pretrained,
        attn_layer=MambaVisionMixer,
        **{**args, **kwargs},
    )
