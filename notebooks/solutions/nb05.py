"""Solutions of the exercises of notebook 5 (Atlas)."""


def stage_scales(num_scales: int) -> list[tuple[int, ...]]:
    """The scales (1-based) each stage of Atlas runs on: stage i on scales i .. L (the finest is dropped after it)."""
    return [tuple(range(i, num_scales + 1)) for i in range(1, num_scales + 1)]


def attention_flops(num_windows: int, queries: int, keys: int, dim: int, batch: int = 1) -> int:
    """FLOPs of softmax(q k^T) v over windows: two matrix products of ``queries x keys x dim`` multiply-adds,
    2 FLOPs each (the softmax is not counted)."""
    return 2 * 2 * batch * num_windows * queries * keys * dim
