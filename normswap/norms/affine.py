"""A per-channel affine layer: what an eval-mode normalisation becomes when it cannot be folded.

Every BatchNorm-family layer in eval mode computes ``y[:, c] = x[:, c]·scale[c] + shift[c]``
(docs/layers.md, "Eval-mode BatchNorm as an affine": ``scale = γ/sqrt(σ²_r+ε)``,
``shift = β − scale·μ_r``). When no preceding Conv/Linear can absorb that affine map (the conv is
reused, its output has other users, there is no conv), :class:`ChannelAffine` keeps it as one
broadcast multiply-add, which exports to ONNX as ``Mul`` + ``Add`` and works for any
``(N, C, *)`` input.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, fx, nn

__all__ = ["ChannelAffine", "channel_affine"]

log = logging.getLogger(__name__)


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Return ``x·scale[c] + shift[c]`` with the channel on dim 1 of an ``(N, C, *)`` input.

    Args:
        x: input of shape ``(N, C)`` or ``(N, C, *spatial)``.
        scale: per-channel factor, shape ``(C,)``.
        shift: per-channel offset, shape ``(C,)``.

    Returns:
        A tensor shaped like ``x``.
    """
    view = [-1] + [1] * (x.dim() - 2)
    return x * scale.reshape(view) + shift.reshape(view)


# A leaf function for torch.fx: ``x.dim()`` cannot be evaluated on a Proxy, so symbolic
# tracing records one call_function node instead of tracing into the body.
fx.wrap("channel_affine")


class ChannelAffine(nn.Module):
    """Per-channel affine map ``y = x·scale[c] + shift[c]`` over dim 1.

    Args:
        scale: per-channel factors, shape ``(C,)``.
        shift: per-channel offsets, shape ``(C,)``.
        trainable: store ``scale``/``shift`` as parameters (True) or as buffers (False).
    """

    def __init__(self, scale: Tensor, shift: Tensor, *, trainable: bool = True) -> None:
        super().__init__()
        if scale.dim() != 1 or shift.shape != scale.shape:
            raise ValueError(
                f"ChannelAffine needs 1-D scale and shift of one shape; got {tuple(scale.shape)} "
                f"and {tuple(shift.shape)}")
        self.num_features = scale.numel()
        self.trainable = trainable
        if trainable:
            self.scale = nn.Parameter(scale.detach().clone())
            self.shift = nn.Parameter(shift.detach().clone())
        else:
            self.register_buffer("scale", scale.detach().clone())
            self.register_buffer("shift", shift.detach().clone())

    @classmethod
    def from_scale_shift(cls, scale: Tensor, shift: Tensor, *, dtype: torch.dtype | None = None,
                         device: torch.device | None = None,
                         trainable: bool = True) -> "ChannelAffine":
        """Build from (possibly float64) scale/shift, cast to ``dtype`` and ``device``.

        Args:
            scale: per-channel factors.
            shift: per-channel offsets.
            dtype: target dtype (default: that of ``scale``).
            device: target device (default: that of ``scale``).
            trainable: see :class:`ChannelAffine`.

        Returns:
            The new layer.
        """
        dtype = dtype or scale.dtype
        device = device or scale.device
        return cls(scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype),
                   trainable=trainable)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the affine map over dim 1."""
        return channel_affine(x, self.scale, self.shift)

    def eval_scale_shift(self) -> tuple[Tensor, Tensor]:
        """Return ``(scale, shift)`` in float64 (the normswap foldable-norm contract)."""
        return self.scale.detach().double(), self.shift.detach().double()

    def extra_repr(self) -> str:
        return f"{self.num_features}, trainable={self.trainable}"
