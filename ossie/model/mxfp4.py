"""The MXFP4 format of gpt-oss's expert weights, and its torch decoding (also the reference the kernels are
tested against). Experts' weights stay packed in memory and are decoded on demand.

MXFP4: `blocks` uint8 [..., G, 16] hold 32 FP4 (E2M1) codes per group, low nibble = even element;
`scales` uint8 [..., G] are E8M0 exponents: value = fp4 * 2**(scale - 127).
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_LUT_CACHE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _luts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> its two fp4 values [256, 2], scale byte -> 2**(s-127) [256]) in float32."""
    if device not in _LUT_CACHE:
        fp4 = torch.tensor(FP4_VALUES, dtype=torch.float32)
        byte = torch.arange(256)
        pairs = torch.stack([fp4[byte & 0x0F], fp4[byte >> 4]], dim=-1)
        # float64 first: 2**-127 is a float32 subnormal, exact; 255 (NaN in the MX spec) gives inf.
        scale = torch.tensor([2.0 ** (e - 127) for e in range(256)], dtype=torch.float64).float()
        _LUT_CACHE[device] = (pairs.to(device), scale.to(device))
    return _LUT_CACHE[device]


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode MXFP4 `blocks` [..., G, 16] and `scales` [..., G] to a dense [..., G*32] tensor."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 shapes do not match: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    pairs, scale_lut = _luts(blocks.device)
    values = pairs[blocks.long()].flatten(-3)  # [..., G, 16, 2] -> [..., G*32]
    factor = scale_lut[scales.long()].repeat_interleave(32, dim=-1)
    return (values * factor).to(dtype)


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W.T + b for an MXFP4 weight W [out, in] (blocks [out, in/32, 16]); decodes only this matrix."""
    w = mxfp4_dequantize(blocks, scales, x.dtype)
    return torch.nn.functional.linear(x, w, bias)
