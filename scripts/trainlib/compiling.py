"""How a training or benchmark script compiles a model: not at all, block by block, or whole."""

from __future__ import annotations

import torch
from torch import nn

COMPILE_MODES = ("none", "regional", "full")


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``model`` compiled as ``mode`` says; the module to call (``model`` itself unless ``mode`` is "full").

    * ``"none"``: eager, as it is;
    * ``"regional"``: each block compiled on its own, in place (Atlas: :meth:`atlas.model.Atlas.compile_regions`,
      the stem's units and the MSA blocks; other models: each of ``model.blocks``, as timm's ViT and many others
      have; a model with neither is compiled whole). Blocks of equal shapes share a graph, so this compiles
      several times faster than ``"full"``;
    * ``"full"``: ``torch.compile(model)``, one graph for the whole model.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return model
    if mode == "regional" and hasattr(model, "compile_regions"):
        return model.compile_regions()
    if mode == "regional" and isinstance(getattr(model, "blocks", None), nn.Sequential | nn.ModuleList):
        for block in model.blocks:
            block.compile(dynamic=False)
        return model
    return torch.compile(model)
