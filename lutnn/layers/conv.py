"""``LUTConv2d``: a drop-in ``nn.Conv2d`` computed as lookups over im2col patches.

Each output pixel's receptive field is unfolded into a row of ``D = Cin * kh * kw``
values ordered ``(cin, kh, kw)``; sub-vectors run along that row, so the default
``V = kh * kw`` makes one sub-vector exactly one input channel's patch (1×1 convs
default like linear layers: the largest divisor of D up to 8).

Unsupported (rejected with an error): ``groups != 1`` (depthwise/grouped convs) and
``padding_mode`` other than ``"zeros"``; string padding ``"same"``/``"valid"`` is
resolved to explicit numbers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .base import LUTBase, default_subvec_len
from .fused import ste_conv2d


def conv_unsupported_reason(layer: nn.Conv2d) -> str | None:
    """Why ``layer`` cannot become a ``LUTConv2d`` (``None`` if it can)."""
    if layer.groups != 1:
        return f"groups={layer.groups} (only groups=1 is supported)"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} (only 'zeros' is supported)"
    return None


def _resolve_padding(padding, kernel_size, dilation) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even effective kernel is asymmetric and not supported")
        return tuple(t // 2 for t in total)
    return _pair(padding)


def default_conv_subvec_len(in_channels: int, kernel_size: tuple[int, int]) -> int:
    """One input channel's ``kh*kw`` patch; 1x1 convs default like linear layers."""
    kh, kw = kernel_size
    return kh * kw if kh * kw > 1 else default_subvec_len(in_channels)


def im2col(x: Tensor, kernel_size: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
           stride: tuple[int, int]) -> Tensor:
    """Receptive fields of ``x [B, Cin, H, W]`` as rows ``[B * Hout * Wout, Cin * kh * kw]``."""
    patches = F.unfold(x, kernel_size, dilation, padding, stride)  # [B, D, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def conv_output_size(h: int, w: int, kernel_size: tuple[int, int], dilation: tuple[int, int],
                     padding: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip((h, w), padding, dilation, kernel_size, stride)
    )


class LUTConv2d(LUTBase):
    """``nn.Conv2d`` (groups=1) whose im2col matmul is a table lookup."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        num_codebooks: int | None = None,
        subvec_len: int | None = None,
        num_prototypes: int = 16,
        init_temperature: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = _resolve_padding(padding, self.kernel_size, self.dilation)
        kh, kw = self.kernel_size
        if num_codebooks is None and subvec_len is None:
            subvec_len = default_conv_subvec_len(in_channels, self.kernel_size)
        super().__init__(
            in_channels * kh * kw, out_channels, num_codebooks, subvec_len, num_prototypes,
            init_temperature, device, dtype,
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        ref = nn.Conv2d(in_channels, out_channels, self.kernel_size, bias=bias, device=device, dtype=dtype)
        self.weight = ref.weight
        self.bias = ref.bias

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, **lut_kwargs) -> "LUTConv2d":
        reason = conv_unsupported_reason(layer)
        if reason:
            raise ValueError(f"cannot convert Conv2d: {reason}")
        p = layer.weight
        lut = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.bias is not None, device=p.device, dtype=p.dtype, **lut_kwargs)
        return lut._copy_dense(layer)

    def weight_2d(self) -> Tensor:
        return self.weight.reshape(self.out_channels, -1)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        return conv_output_size(h, w, self.kernel_size, self.dilation, self.padding, self.stride)

    def rows(self, x: Tensor) -> Tensor:
        """im2col patches as ``[B * Hout * Wout, D]`` rows (what calibration captures)."""
        return im2col(x, self.kernel_size, self.dilation, self.padding, self.stride)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"LUTConv2d expects [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.effective_mode() == "dense":
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        b = x.shape[0]
        h_out, w_out = self.output_size(x.shape[2], x.shape[3])
        if self.fused_ste():
            with self._fp32(x):  # fp32 codes and sums for fp16/bf16 layers too; output in the weight's dtype
                b32 = None if self.bias is None else self.bias.float()
                y = ste_conv2d(x.float(), self.prototypes.float(), self.weight.float(), b32, self.log_tau.float(),
                               self.kernel_size, self.dilation, self.padding, self.stride, (h_out, w_out),
                               self.ste_impl == "compiled")
                return y.to(self.weight.dtype)
        y = self._matmul_rows(self.rows(x))  # [B*L, M]
        y = y.reshape(b, h_out * w_out, self.out_channels).transpose(1, 2)
        return y.reshape(b, self.out_channels, h_out, w_out)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, " + super().extra_repr().split(", ", 2)[2]
        )
