"""Atlas and Multi-Scale Attention. Importing this package registers the Atlas models with timm."""

from .convert import convert_released_state_dict, load_released
from .model import Atlas, AtlasConfig, atlas_base_patch16, atlas_small_patch16, atlas_tiny_patch16
from .msa import MSABlock
from .scales import MultiScaleLayout

__all__ = [
    "Atlas",
    "AtlasConfig",
    "MSABlock",
    "MultiScaleLayout",
    "atlas_base_patch16",
    "atlas_small_patch16",
    "atlas_tiny_patch16",
    "convert_released_state_dict",
    "load_released",
]
