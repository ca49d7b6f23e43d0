"""Bytes of optimizer state (moments only; the fp32 master copy is the precision recipe's)."""

from __future__ import annotations

from memcalc.config import Optimizer
from memcalc.dtypes import DType, storage_bytes
from memcalc.estimate.params import ParamInventory

# bitsandbytes 8-bit optimizers (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state):
# tensors with fewer than ``min_8bit_size`` elements keep 32-bit states; the others store each
# state as uint8 codes plus one fp32 absmax per block of 256 elements. Block-wise quantisation is
# from Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (arXiv:2110.02861),
# whose blocks were 2048 elements; bitsandbytes uses 256 since release 0.44.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256

MOMENTS_PER_PARAM: dict[Optimizer, int] = {
    Optimizer.ADAMW: 2,  # exp_avg, exp_avg_sq
    Optimizer.ADAM: 2,
    Optimizer.ADAM8BIT: 2,
    Optimizer.SGD: 0,
    Optimizer.SGD_MOMENTUM: 1,  # momentum_buffer
}


def eight_bit_state_bytes(num_elements: int) -> int:
    """One bitsandbytes 8-bit state of a tensor with ``num_elements`` elements."""
    if num_elements < BNB_MIN_8BIT_SIZE:
        return storage_bytes(num_elements, DType.FP32)
    num_blocks = -(-num_elements // BNB_BLOCK_SIZE)
    return num_elements + storage_bytes(num_blocks, DType.FP32)


def optimizer_state_bytes(optimizer: Optimizer, params: ParamInventory, state_dtype: DType) -> int:
    """Moments for every trainable tensor. ``state_dtype`` applies to full-precision optimizers."""
    moments = MOMENTS_PER_PARAM[optimizer]
    if optimizer is Optimizer.ADAM8BIT:
        return sum(moments * eight_bit_state_bytes(group.numel) * group.count for group in params.groups)
    return moments * storage_bytes(params.total, state_dtype)
