"""Load checkpoints of the released Atlas implementation into :class:`atlas.model.Atlas`.

The released model keeps one sub-model per stage (``atlas_models.{stage}``) whose blocks hold one layer
per active scale (``levels.0.blocks.{block}.blocks.{scale}``) and one position MLP per scale
(``posemb.{scale}.projector``). Each stage also carries a BatchNorm and a classifier that its forward pass
never calls; they are dropped. Everything else maps one to one::

    python -m atlas.convert released.pth converted.pth
"""

from __future__ import annotations

import argparse
import collections
import pickle
import re
from pathlib import Path

import torch

# (pattern over a released key, replacement in our naming); the first match wins, None drops the key.
RULES: list[tuple[str, str | None]] = [
    (r"^atlas_models\.\d+\.(norm|head)\.", None),
    (r"^atlas_models\.0\.patch_embed\.conv0\.(\d+)\.", r"stem.embed.\1."),
    (r"^atlas_models\.0\.patch_embed\.conv([12])\.(\d+)\.conv_block([12])\.0\.", r"stem.stage\1.\2.conv\3."),
    (r"^atlas_models\.0\.patch_embed\.conv([12])\.(\d+)\.conv_block([12])\.1\.", r"stem.stage\1.\2.bn\3."),
    (r"^atlas_models\.0\.patch_embed\.ds([12])\.", r"stem.down\1."),
    (
        r"^atlas_models\.(\d+)\.levels\.0\.blocks\.(\d+)\.posemb\.(\d+)\.projector\.0\.",
        r"stages.\1.blocks.\2.scales.\3.pos.fc1.",
    ),
    (
        r"^atlas_models\.(\d+)\.levels\.0\.blocks\.(\d+)\.posemb\.(\d+)\.projector\.2\.",
        r"stages.\1.blocks.\2.scales.\3.pos.fc2.",
    ),
    (
        r"^atlas_models\.(\d+)\.levels\.0\.blocks\.(\d+)\.blocks\.(\d+)\.norm1_(q|kv)\.",
        r"stages.\1.blocks.\2.scales.\3.norm_\4.",
    ),
    (
        r"^atlas_models\.(\d+)\.levels\.0\.blocks\.(\d+)\.blocks\.(\d+)\.(attn|norm2|mlp)\.",
        r"stages.\1.blocks.\2.scales.\3.\4.",
    ),
    (r"^(readout_norm|fc_norm)\.", r"\1."),
    (r"^fc\.", "head."),
]


def is_released_state_dict(state_dict: dict) -> bool:
    return any(key.startswith("atlas_models.") for key in state_dict)


def convert_released_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a released state dict to ours; a key no rule knows is a KeyError naming it."""
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in RULES:
            if re.match(pattern, key):
                if replacement is not None:
                    converted[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise KeyError(f"key {key!r} is not part of the released Atlas format this converter knows")
    return converted


# The argument object the released training script pickles next to the weights (``latest.ckpt``, ``epoch=N.ckpt``).
RELEASED_ARGUMENTS = "easydict.EasyDict"


def safe_load(path: str | Path):
    """``torch.load(path, weights_only=True)``, also for released training checkpoints: their ``EasyDict`` of
    arguments loads as a ``collections.OrderedDict`` (that name alone is mapped, to an inert class: loading never
    runs code a checkpoint names). A file that is not a readable checkpoint is a ValueError saying so."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if RELEASED_ARGUMENTS not in str(error):
                raise
        with torch.serialization.safe_globals([(collections.OrderedDict, RELEASED_ARGUMENTS)]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} is not a checkpoint this code can read safely (truncated, not written by torch.save, or it "
            f"pickles objects other than tensors and plain containers): {reason}"
        ) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely (:func:`safe_load`), unwrapping a ``state_dict``/``model`` entry."""
    checkpoint = safe_load(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
    return checkpoint


def load_released(model: torch.nn.Module, source: str | Path | dict) -> torch.nn.Module:
    """Load released weights (a path or a state dict) into ``model`` with ``strict=True``."""
    state_dict = source if isinstance(source, dict) else load_state_dict_file(source)
    model.load_state_dict(convert_released_state_dict(state_dict), strict=True)
    return model


def convert_file(source: Path, output: Path) -> None:
    """Write the converted state dict of the released checkpoint ``source`` to ``output`` (never ``source``
    itself); a ValueError or OSError in one line if it cannot."""
    if output.resolve() == source.resolve():
        raise ValueError(f"{output} is the input: write the converted weights to another file")
    if output.is_dir():
        raise ValueError(f"{output} is a folder: name the file to write the converted weights to")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"output folder {output.parent} does not exist")
    state_dict = load_state_dict_file(source)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{source} holds no state dict (a mapping of names to tensors)")
    if not is_released_state_dict(state_dict):
        raise ValueError(
            f"{source} is not in the released Atlas format (no 'atlas_models.' keys); this package's own state "
            "dicts load as they are"
        )
    try:
        converted = convert_released_state_dict(state_dict)
    except KeyError as error:
        raise ValueError(f"{source}: {error.args[0]}") from None
    try:
        torch.save(converted, output)
    except RuntimeError as error:  # torch.save reports a file it cannot open as a RuntimeError
        raise ValueError(f"cannot write {output}: {str(error).strip().splitlines()[-1]}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a released Atlas checkpoint to this package's format")
    parser.add_argument("source", type=Path, help="released checkpoint (.pth/.pt)")
    parser.add_argument("output", type=Path, help="where to write the converted state dict (not the source)")
    args = parser.parse_args(argv)
    try:
        convert_file(args.source, args.output)
    except (ValueError, OSError) as error:
        detail = f"{error.strerror}: {error.filename}" if isinstance(error, OSError) and error.strerror else error
        raise SystemExit(f"error: {detail}") from None
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
