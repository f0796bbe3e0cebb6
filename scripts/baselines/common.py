"""What the baseline modules share: their timm pretrained configs (no weights are published for them)."""

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def pretrained_cfg(first_conv: str = "patch_embed.proj", **kwargs) -> dict:
    """timm's data and head config of a model without weights: ImageNet statistics, 224px unless given."""
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": "head",
        **kwargs,
    }
