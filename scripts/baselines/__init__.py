"""The baselines of the paper's Tables 1-3 (arXiv:2503.12355) that timm lacks, registered with timm by name.

    import baselines  # from scripts/, as scripts/train.py imports trainlib
    timm.create_model("longvit_base_patch16", img_size=1024, num_classes=100)

Own implementations, written from the peers' papers (each module says what it follows and how it differs
from the authors' code):

* ``dilated``: LongNet's dilated attention; LongViT-B/16 (``longvit_base_patch16``).
* ``mamba``: Mamba's selective scan in plain PyTorch, MambaVision's mixer, MambaVision-S and -B
  (``mambavision_small``, ``mambavision_base``) and a ViT with the mixer in place of attention
  (``vit_mambavision_mixer_base_patch16``).
* ``hierarchical``: FasterViT's hierarchical attention with carrier tokens on a ViT (``hat_vit_base_patch16``).

The authors' own FasterViT and MambaVision come from optional packages, named ``<package>/<model>`` in a
config (:func:`create_optional`); their licences are theirs, not this repository's (see ``OPTIONAL_PACKAGES``).
"""

from __future__ import annotations

import importlib

from torch import nn

from . import dilated, hierarchical, mamba  # noqa: F401  (register the models with timm)

# package -> (how to install it, its licence). mambavision 1.2.0 pins timm 1.0.15, older than this repository
# needs, so it is installed without its pins, after the kernels of the `mamba` extra.
OPTIONAL_PACKAGES = {
    "fastervit": ("pip install -e '.[fastervit]'", "NVIDIA Source Code License-NC, non-commercial"),
    "mambavision": (
        "pip install -e '.[mamba]' && pip install --no-deps mambavision==1.2.0",
        "NVIDIA Source Code License-NC, non-commercial",
    ),
}


def create_optional(name: str, img_size: int, **kwargs) -> nn.Module:
    """The model ``"<package>/<model>"`` of an optional package at ``img_size`` (square), e.g.
    ``fastervit/faster_vit_4_any_res``; ``kwargs`` go to the package's ``create_model``.

    Raises ValueError for an unknown package and ImportError, with the install command, when it is missing.
    """
    package, _, model = name.partition("/")
    if package not in OPTIONAL_PACKAGES or not model:
        names = ", ".join(f"{p}/<model>" for p in OPTIONAL_PACKAGES)
        raise ValueError(f"{name!r} is not a model of an optional package; expected one of {names}")
    install, licence = OPTIONAL_PACKAGES[package]
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        raise ImportError(
            f"model {name} needs the optional package {package}: {install} (licence: {licence}); "
            f"importing it failed: {error}"
        ) from None
    return module.create_model(model, resolution=[img_size, img_size], **kwargs)
