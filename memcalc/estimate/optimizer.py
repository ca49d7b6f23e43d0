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
    # Adafactor (Shazeer & Stern 2018, arXiv:1804.04235; transformers' Adafactor with beta1=None, its
    # default): no first moment; the second moment of a matrix is factored into a row and a
    # column vector, kept whole for vectors (factored_state_elements)
    Optimizer.ADAFACTOR: 0,
    Optimizer.LION: 1,  # exp_avg (Chen et al. 2023, arXiv:2302.06675: "only keeps track of the momentum")
    Optimizer.ADEMAMIX: 3,  # fast and slow EMAs and the second moment (Pagliardini et al. 2024, arXiv:2409.03137)
    Optimizer.SGD: 0,
    Optimizer.SGD_MOMENTUM: 1,  # momentum_buffer
}


def eight_bit_state_bytes(num_elements: int) -> int:
    """One bitsandbytes 8-bit state of a tensor with ``num_elements`` elements."""
    if num_elements < BNB_MIN_8BIT_SIZE:
        return storage_bytes(num_elements, DType.FP32)
    num_blocks = -(-num_elements // BNB_BLOCK_SIZE)
    return num_elements + storage_bytes(num_blocks, DType.FP32)


def factored_state_elements(matrices: list[tuple[int, int, int]], vector_elements: int) -> int:
    """Adafactor's second moment: rows + columns per matrix (``(d_in, d_out, count)``), every
    element of a vector (norms, biases)."""
    return sum((d_in + d_out) * count for d_in, d_out, count in matrices) + vector_elements


def optimizer_state_bytes(optimizer: Optimizer, params: ParamInventory, state_dtype: DType,
                          matrices: list[tuple[int, int, int]] | None = None) -> int:
    """Moments for every trainable tensor. ``state_dtype`` applies to full-precision optimizers;
    Adafactor needs the matrices' shapes (``(d_in, d_out, count)``, the rest counted as vectors)."""
    moments = MOMENTS_PER_PARAM[optimizer]
    if optimizer is Optimizer.ADAM8BIT:
        return sum(moments * eight_bit_state_bytes(group.numel) * group.count for group in params.groups)
    if optimizer is Optimizer.ADAFACTOR:
        matrices = matrices or []
        in_matrices = sum(d_in * d_out * count for d_in, d_out, count in matrices)
        return storage_bytes(factored_state_elements(matrices, max(params.total - in_matrices, 0)), state_dtype)
    return moments * storage_bytes(params.total, state_dtype)
