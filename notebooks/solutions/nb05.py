"""Solutions of the exercises of notebook 5 (Atlas)."""

import torch
from einops import rearrange

from atlas import Atlas
from atlas.msa import BlockGeometry
from atlas.scales import build_pyramid, image_to_map, map_to_image


def atlas_from_parts(model: Atlas, images: torch.Tensor) -> torch.Tensor:
    """Algorithm 2 from the model's submodules: stem -> scales -> stages, dropping the finest scale after each
    stage but the last -> readout. ``images`` ``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
    layout = model.config.layout_for(tuple(images.shape[-2:]))
    maps = build_pyramid(image_to_map(model.stem(images)), layout)  # [X_1, ..., X_L], each (B, h_l, w_l, C)
    for first, stage in enumerate(model.stages):
        geo = BlockGeometry.build(layout, first, model.config.routing, model.config.top_down)
        for block in stage.blocks:
            maps = block(maps, geo)
        if first < len(model.stages) - 1:
            maps = maps[1:]  # progressive scale dropping
    tokens = rearrange(maps[-1], "b h w c -> b (h w) c")  # only X_L is left
    return model.head(model.fc_norm(model.readout_norm(tokens).mean(dim=1)))


def stage_features(model: Atlas, images: torch.Tensor) -> list[torch.Tensor]:
    """Feature ``i`` for a dense head: scale ``i`` as stage ``i`` leaves it, just before it is dropped (the last
    stage: the coarsest scale), each ``(B, C, h_i, w_i)``."""
    layout = model.config.layout_for(tuple(images.shape[-2:]))
    maps = build_pyramid(image_to_map(model.stem(images)), layout)
    features = []
    for first, stage in enumerate(model.stages):
        geo = BlockGeometry.build(layout, first, model.config.routing, model.config.top_down)
        for block in stage.blocks:
            maps = block(maps, geo)
        features.append(map_to_image(maps[0]))
        maps = maps[1:]
    return features
