"""FLOPs and training memory of a model at any input size, counted without running it for real.

The weights are swapped for meta tensors (``torch.func.functional_call``), so only shapes flow through the
forward pass: a 4096px ViT, whose attention matrices alone would need hundreds of GB, is counted in well
under a second and allocates nothing. FLOPs are counted as ``torch.utils.flop_counter`` counts them: 2 per
multiply-add of convolutions, matrix products and attention; normalisations, activations, pooling and
additions are not counted.

    model = build_model("atlas_base_patch16", (1024, 1024))
    atlas_flops_breakdown(model, (1, 3, 1024, 1024))  # {"stem": ..., "blocks": ..., "head": ..., "total": ...}
    training_peak_bytes(model, (1, 3, 1024, 1024))  # the most bytes alive at once in forward + backward

Memory is followed the same way, on fake tensors (shapes and storage sizes, no data): every storage an
operator creates is counted while Python or autograd holds it, so the peak is what the tensors of a training
step would occupy, before any allocator's caching or fragmentation.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
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


def create_at_size(name: str, img_size: tuple[int, int], **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` for an image size: passed as ``img_size`` to models that take it (ViT,
    Atlas); models without it (ConvNeXt, ResNet, ...) take any input size as they are."""
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as error:
        if "img_size" not in str(error):
            raise
    return timm.create_model(name, **kwargs)


def build_model(name: str, img_size: tuple[int, int], num_classes: int = 1000, device="cpu") -> nn.Module:
    """:func:`create_at_size` on ``device``, after checking the name. With ``device="meta"`` nothing is allocated,
    but a constructor that reads tensor values cannot run there; then the model is built on the CPU (its weights
    cost memory; :func:`count_flops` still runs it on meta).
    """
    check_model_name(name)
    return build_on(device, partial(create_at_size, name, img_size, num_classes=num_classes))


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


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive now and at most, over the tensors given to :meth:`hold` and every operator's
    outputs. A storage counts once (views share it) and stops counting when it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held = weakref.WeakSet()

    def hold(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._held:
            return
        self._held.add(storage)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, storage.nbytes())

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.hold(leaf)
        return out


ATTENTION_KERNELS = {"fused": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], "math": [SDPBackend.MATH]}


def training_peak_bytes(model: nn.Module, input_shape: tuple[int, ...], attention: str = "fused") -> int:
    """The most bytes alive at once while ``model`` runs forward and backward (of the output's sum) on the CPU.

    Counted on fake tensors, so nothing is allocated: weights, input, activations kept for backward, gradients
    and temporaries, in float32 as the weights are. ``attention`` picks the kernels of
    ``F.scaled_dot_product_attention``: ``"fused"`` (the CPU's flash kernel where it applies, as by default;
    it never stores the attention weights) or ``"math"`` (softmax(q k^T) as a tensor, kept for backward).
    ``model`` is left untouched.
    """
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {sorted(ATTENTION_KERNELS)}, got {attention!r}")
    cpu = torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True), sdpa_kernel(ATTENTION_KERNELS[attention]):
        tensors = {name: _stand_in(t, cpu) for name, t in [*model.named_parameters(), *model.named_buffers()]}
        x = torch.zeros(input_shape)
        with _LiveBytes() as memory:
            for tensor in [*tensors.values(), x]:
                memory.hold(tensor)
            functional_call(model, tensors, (x,)).float().sum().backward()
    return memory.peak


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (Linux), or ""."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
