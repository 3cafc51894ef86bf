"""The MXFP4 decode path against a direct dequantization of known bytes."""

import pytest
import torch

from ossie.model.mxfp4 import FP4_VALUES, mxfp4_dequantize, mxfp4_linear

SPEC = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_code_table_is_e2m1():
    assert list(FP4_VALUES) == SPEC


@pytest.mark.parametrize("scale", [0, 1, 100, 126, 127, 128, 130, 200, 254])
def test_every_code_in_both_nibbles(scale):
    # 256 bytes: every (low, high) nibble pair once; 16 groups of 16 bytes
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16)
    scales = torch.full((16,), scale, dtype=torch.uint8)
    out = mxfp4_dequantize(blocks, scales, torch.float32)
    assert out.shape == (512,)
    factor = 2.0 ** (scale - 127)

    def f32(v: float) -> float:  # the exact value rounded to float32 (6 * 2**127 is past float32's range: inf)
        return torch.tensor(v, dtype=torch.float64).float().item()

    for byte in range(256):
        lo, hi = out[2 * byte].item(), out[2 * byte + 1].item()
        assert lo == f32(SPEC[byte & 15] * factor), (byte, lo)
        assert hi == f32(SPEC[byte >> 4] * factor), (byte, hi)
    # signed zero survives: code 8 is -0
    assert torch.signbit(out[16]).item()  # byte 8: low nibble 8


def test_groups_take_their_own_scale():
    blocks = torch.full((2, 3, 16), 0x72, dtype=torch.uint8)  # low nibble 2 (+1.0), high nibble 7 (+6.0)
    scales = torch.tensor([[120, 127, 135], [0, 254, 127]], dtype=torch.uint8)
    out = mxfp4_dequantize(blocks, scales).view(2, 3, 32)
    for r in range(2):
        for g in range(3):
            f = 2.0 ** (int(scales[r, g]) - 127)
            assert out[r, g, 0::2].eq(1.0 * f).all() and out[r, g, 1::2].eq(6.0 * f).all()


def test_bf16_output_exact_for_normal_scales():
    blocks = torch.randint(0, 256, (4, 8, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scales = torch.randint(100, 150, (4, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mxfp4_dequantize(blocks, scales, torch.bfloat16).float(), mxfp4_dequantize(blocks, scales))


def test_linear_uses_decoded_matrix():
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (5, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 130, (5, 2), dtype=torch.uint8, generator=g)
    x, b = torch.randn(3, 64, generator=g), torch.randn(5, generator=g)
    w = mxfp4_dequantize(blocks, scales)
    assert torch.allclose(mxfp4_linear(x, blocks, scales, b), x @ w.T + b)


def test_bad_inputs():
    with pytest.raises(TypeError):
        mxfp4_dequantize(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        mxfp4_dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
