"""FasterViT's hierarchical attention (HAT; Hatamizadeh et al. 2024, arXiv:2306.06189) on a ViT.

The token grid is cut into ``window x window`` windows, and each window owns ``ct x ct`` carrier tokens: at
the start an average of its tokens after a depthwise convolution (FasterViT's token initializer). Each HAT
block (FasterViT's Eq. 2-4)

1. lets all carrier tokens attend to each other (attention and MLP: the global step), then
2. runs window attention and MLP over each window's carriers and tokens together, which updates both.

After the last block the carriers are added back onto the tokens of their window (FasterViT's propagation,
nearest up-sampling), then LayerNorm, mean pooling and the head. Both steps are timm's ``Block``. With
``depth=4, patch_size=4`` this is the paper's Table 3 block-level setting; FasterViT itself puts HAT into one
stage of a hierarchical convolution/attention model (``pip install -e '.[fastervit]'`` for that).

Written from the paper; it differs from the authors' code (NVlabs/FasterViT) in that:

* positions: a learned absolute embedding of the token grid, which the carriers inherit through the pooling
  (FasterViT adds MLP-generated position biases to windows and carriers instead);
* no layer scale (the other Table 3 blocks have none either), and the carriers are propagated after the last
  block without FasterViT's learned scale;
* the token grid must be a whole number of windows (FasterViT pads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from .common import pretrained_cfg


class HATBlock(nn.Module):
    """One HAT block: tokens ``(B, H, W, C)`` and carriers ``(B, H / window * ct, W / window * ct, C)``."""

    def __init__(self, dim: int, num_heads: int, window: int, ct: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window, self.ct = window, ct
        self.carrier_block = Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path)
        self.window_block = Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path)

    def forward(self, x: torch.Tensor, carriers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = x.shape[1] // self.window, x.shape[2] // self.window
        carriers = self.carrier_block(carriers.flatten(1, 2)).view_as(carriers)  # global: all carriers
        to_windows = "b (m p) (n q) c -> (b m n) (p q) c"
        tokens = torch.cat(
            [
                rearrange(carriers, to_windows, p=self.ct, q=self.ct),
                rearrange(x, to_windows, p=self.window, q=self.window),
            ],
            dim=1,
        )
        carriers, x = self.window_block(tokens).split([self.ct**2, self.window**2], dim=1)
        from_windows = "(b m n) (p q) c -> b (m p) (n q) c"
        x = rearrange(x, from_windows, m=rows, n=cols, p=self.window)
        return x, rearrange(carriers, from_windows, m=rows, n=cols, p=self.ct)


class HierarchicalViT(nn.Module):
    """A ViT whose blocks are HAT blocks: images ``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        window_size: int = 7,
        ct_size: int = 2,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC")
        grid = self.patch_embed.grid_size
        if grid[0] % window_size or grid[1] % window_size or window_size % ct_size:
            raise ValueError(
                f"HAT needs a token grid of whole windows and windows of whole carrier cells: grid {grid}, "
                f"window_size {window_size}, ct_size {ct_size}"
            )
        self.num_classes, self.num_features, self.cell = num_classes, embed_dim, window_size // ct_size
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim))
        self.carrier_conv = nn.Conv2d(embed_dim, embed_dim, 3, padding=1, groups=embed_dim)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(HATBlock(embed_dim, num_heads, window_size, ct_size, mlp_ratio, p) for p in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.apply(init_weights_vit_timm)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> tokens ``(B, H / patch, W / patch, C)``."""
        x = self.patch_embed(x) + self.pos_embed
        carriers = F.avg_pool2d(self.carrier_conv(x.permute(0, 3, 1, 2)), self.cell).permute(0, 2, 3, 1)
        for block in self.blocks:
            x, carriers = block(x, carriers)
        x = x + carriers.repeat_interleave(self.cell, dim=1).repeat_interleave(self.cell, dim=2)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({"hat_vit_base_patch16": pretrained_cfg()})


@register_model
def hat_vit_base_patch16(pretrained: bool = False, **kwargs) -> HierarchicalViT:
    """ViT-B/16 (C=768, 12 heads) with HAT blocks, windows of 7x7 tokens, 2x2 carriers each (no weights)."""
    return build_model_with_cfg(HierarchicalViT, "hat_vit_base_patch16", pretrained, **kwargs)
