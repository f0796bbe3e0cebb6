"""FLOPs of a model at any input size, counted without running it for real.

The weights are swapped for meta tensors (``torch.func.functional_call``), so only shapes flow through the
forward pass: a 4096px ViT, whose attention matrices alone would need hundreds of GB, is counted in well
under a second and allocates nothing. FLOPs are counted as ``torch.utils.flop_counter`` counts them: 2 per
multiply-add of convolutions, matrix products and attention; normalisations, activations, pooling and
additions are not counted.

    model = build_model("atlas_base_patch16", (1024, 1024))
    atlas_flops_breakdown(model, (1, 3, 1024, 1024))  # {"stem": ..., "blocks": ..., "head": ..., "total": ...}
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_fused_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention kernel is missing from PyTorch's FLOP table; it does the work of any SDPA."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# So that counting on the CPU agrees with counting on the meta device (where SDPA decomposes into matmuls).
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_fused_attention_flops}


def check_model_name(name: str) -> None:
    """Raise a ValueError naming the closest timm models if ``name`` is not one (Atlas names need ``import atlas``)."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (list them with timm.list_models('*pattern*'))")


def build_model(name: str, img_size: tuple[int, int], num_classes: int = 1000, device="cpu") -> nn.Module:
    """``timm.create_model`` for an image size: passed as ``img_size`` to models that take it (ViT, Atlas).

    Models without ``img_size`` (ConvNeXt, ResNet, ...) take any input size as they are. With
    ``device="meta"`` nothing is allocated, but a constructor that reads tensor values cannot run there; then
    the model is built on the CPU (its weights cost memory; :func:`count_flops` still runs it on meta).
    """
    check_model_name(name)
    try:
        return build_on(device, partial(timm.create_model, name, num_classes=num_classes, img_size=img_size))
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    return build_on(device, partial(timm.create_model, name, num_classes=num_classes))


def build_on(device, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its tensors on ``device``; on the CPU instead where ``device`` is meta and the constructor
    reads tensor values, which meta tensors do not have ("Cannot copy out of meta tensor", ``.item()``)."""
    try:
        with torch.device(device):
            return build()
    except (NotImplementedError, RuntimeError):
        if torch.device(device).type != "meta":
            raise
    return build()


def _stand_in(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor to run in place of a parameter or buffer: same shape, on ``device``, never sharing its storage."""
    copy = tensor.clone() if tensor.device == device else torch.zeros_like(tensor, device=device)
    return copy.detach().requires_grad_(tensor.requires_grad)


def flops_by_module(
    model: nn.Module, input_shape: tuple[int, ...], device="meta", backward: bool = False
) -> dict[str, int]:
    """FLOPs of ``model`` on an input of ``input_shape``, per module that ran and in all (``"Global"``).

    Forward only, under ``no_grad``; with ``backward=True`` the forward pass plus the backward pass of the
    output's sum (gradients for the parameters, not for the input). Module names are dotted paths under the
    model's class name (``"Atlas.stem"``); a module's count includes the modules it called. Values do not
    matter, so the pass runs on stand-ins of the weights on ``device`` (free on ``meta``) and ``model``
    is left untouched.
    """
    device = torch.device(device)
    tensors = {name: _stand_in(t, device) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.zeros(input_shape, device=device)
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        with torch.set_grad_enabled(backward):
            out = functional_call(model, tensors, (x,))
        if backward:
            out.float().sum().backward()
    return {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}


def count_flops(model: nn.Module, input_shape: tuple[int, ...], device="meta", backward: bool = False) -> int:
    """FLOPs of ``model`` on an input of ``input_shape`` ``(B, C, H, W)`` (all images of the batch).

    Forward only, or with ``backward=True`` forward and backward (see :func:`flops_by_module`).
    """
    return flops_by_module(model, input_shape, device, backward)["Global"]


def atlas_flops_breakdown(model: nn.Module, input_shape: tuple[int, ...], device="meta") -> dict[str, int]:
    """Forward FLOPs of an Atlas model split into ``stem``, ``blocks`` (all stages), ``head`` and ``total``.

    Building the scales (max-pooling) and the LayerNorms of the readout cost no counted FLOPs, so
    ``stem + blocks + head == total``.
    """
    counts = flops_by_module(model, input_shape, device)
    root = type(model).__name__
    blocks = sum(counts.get(f"{root}.stages.{i}", 0) for i in range(len(model.stages)))
    return {
        "stem": counts.get(f"{root}.stem", 0),
        "blocks": blocks,
        "head": counts.get(f"{root}.head", 0),
        "total": counts["Global"],
    }


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (Linux), or ""."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
