"""normswap's layers: one file per family."""

from .affine import ChannelAffine
from ._common import InvalidBatchNormError
from ._compile import compile_enabled, set_compile
from ._cpu_kernels import cpu_kernels_enabled, set_cpu_kernels
from ._cpu_kernels import status as cpu_kernels_status
from .base import BatchStatNorm
from .kalman import (
    KalmanBatchNorm,
    KalmanBatchNorm1d,
    KalmanBatchNorm2d,
    KalmanBatchNorm3d,
    kalman_from_batchnorm,
    set_kalman_gain,
)
from .lp_batchnorm import (
    L1BatchNorm,
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
    calibrate_linf,
    l1_from_batchnorm,
    linf_from_batchnorm,
)
from .normprop import (
    NormPropConv1d,
    NormPropConv2d,
    NormPropConv3d,
    NormPropCorrection,
    NormPropLinear,
)
from .sync import SyncKalmanBatchNorm, SyncL1BatchNorm, SyncLinfBatchNorm

__all__ = [
    "BatchStatNorm", "ChannelAffine", "InvalidBatchNormError", "set_compile", "compile_enabled",
    "set_cpu_kernels", "cpu_kernels_enabled", "cpu_kernels_status",
    "KalmanBatchNorm", "KalmanBatchNorm1d", "KalmanBatchNorm2d", "KalmanBatchNorm3d",
    "kalman_from_batchnorm", "set_kalman_gain",
    "L1BatchNorm", "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "LinfBatchNorm", "LinfBatchNorm1d", "LinfBatchNorm2d", "LinfBatchNorm3d",
    "calibrate_linf", "l1_from_batchnorm", "linf_from_batchnorm",
    "NormPropConv1d", "NormPropConv2d", "NormPropConv3d", "NormPropCorrection", "NormPropLinear",
    "SyncKalmanBatchNorm", "SyncL1BatchNorm", "SyncLinfBatchNorm",
]
