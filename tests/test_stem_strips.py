"""The stem's convolutions in strips (``atlas.stem.StripConv2d``): what the whole convolution computes, and no
convolution past cuDNN's 2^31 - 1 elements per image at 16,384px."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atlas.stem import INT32_MAX, ConvStem, StripConv2d


@pytest.fixture
def strips_from(monkeypatch):
    """Lower the strip threshold for one test: ``strips_from(n)``."""
    return lambda n: monkeypatch.setattr(StripConv2d, "max_elements", n)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(16, 16), (13, 9), (5, 2)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_a_strip_convolution_equals_the_whole_one(stride, size, memory_format, strips_from):
    torch.manual_seed(0)
    conv = StripConv2d(3, 4, 3, stride, 1).double()
    x = torch.randn(2, 3, *size, dtype=torch.double).contiguous(memory_format=memory_format).requires_grad_()
    want = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride, 1)
    cotangent = torch.randn_like(want)
    want_grads = torch.autograd.grad((want * cotangent).sum(), (x, conv.weight, conv.bias))
    strips_from(3 * size[1] * 3)  # three input rows, the fewest one output row can need
    assert conv.strip_rows(x.shape) is not None
    got = conv(x)
    got_grads = torch.autograd.grad((got * cotangent).sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("size", [(64, 64), (70, 53)])
def test_a_stem_in_strips_trains_as_the_whole_stem(memory_format, size, strips_from):
    """Outputs, input and weight gradients and the batch norms' running statistics, float64, training mode."""
    torch.manual_seed(0)
    stem = ConvStem(3, 8, 16, 1, memory_format).double().train()
    whole = copy.deepcopy(stem)
    x = torch.randn(2, 3, *size, dtype=torch.double)
    x_whole, x_strips = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = whole(x_whole)
    cotangent = torch.randn_like(want)
    (want * cotangent).sum().backward()
    strips_from(8000)  # the embedding's two convolutions run in strips (64 channels at 32x32 is 65,536 per image)
    convs = [m for m in stem.modules() if isinstance(m, StripConv2d)]
    striped = []
    for conv in convs:
        conv.register_forward_pre_hook(lambda m, args: striped.append(m.strip_rows(args[0].shape) is not None))
    got = stem(x_strips)
    (got * cotangent).sum().backward()
    assert sum(striped) == 2, striped
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_strips.grad, x_whole.grad, rtol=0, atol=1e-12)
    for (name, p), q in zip(stem.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
    for b, c in zip(stem.buffers(), whole.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=0, atol=1e-14)


def test_strips_start_past_int32_elements_per_image():
    conv = StripConv2d(64, 96, 3, 2, 1)
    assert conv.strip_rows(torch.Size([8, 64, 4096, 4096])) is None  # 2^30 per image: whole, batch or not
    rows = conv.strip_rows(torch.Size([1, 64, 8192, 8192]))  # 2^32 input elements per image
    assert rows is not None and 1 <= rows < 4096
    assert ((rows - 1) * 2 + 3) * 64 * 8192 <= INT32_MAX and rows * 96 * 4096 <= INT32_MAX


def test_a_dilated_convolution_is_refused_rather_than_cut_wrongly(strips_from):
    strips_from(10)
    conv = StripConv2d(1, 1, 3, 1, 2, dilation=2)
    with pytest.raises(ValueError, match="zero padding and no dilation"):
        conv(torch.randn(1, 1, 8, 8))


class ConvolutionSizes(TorchDispatchMode):
    """The largest per-image input and output of every convolution that runs."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            x = args[0]
            self.calls += 1
            self.largest = max(self.largest, x[0].numel(), out[0].numel())
        return out


@pytest.mark.parametrize("width", [96, 192], ids=["Atlas-S", "Atlas-B"])
def test_no_stem_convolution_passes_int32_elements_at_16384px(width):
    """On the meta device (no memory, no arithmetic): the 16,384px stem of Atlas-S/16 and Atlas-B/16, whose
    first feature maps hold 4.3e9 (S) and 3.2e9 (B, stage 1) elements per image."""
    with torch.device("meta"):
        stem = ConvStem(3, width, 16, 3, "channels_last")
        x = torch.empty(1, 3, 16384, 16384)
    sizes = ConvolutionSizes()
    with sizes, torch.no_grad():
        out = stem(x)
    assert out.shape == (1, 4 * width, 1024, 1024)
    assert sizes.calls > 2 + 4 * 3  # strips: more convolution calls than the stem has convolutions
    assert sizes.largest <= INT32_MAX
