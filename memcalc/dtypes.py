"""Numeric storage formats and their sizes: the single source of truth for bytes per element."""

from enum import StrEnum


class DType(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"


# Bits rather than bytes so that sub-byte formats stay exact integers.
BITS_PER_ELEMENT: dict[DType, int] = {
    DType.FP32: 32,
    DType.FP16: 16,
    DType.BF16: 16,
    DType.FP8: 8,
    DType.INT8: 8,
    DType.INT4: 4,
}


def storage_bytes(num_elements: int, dtype: DType) -> int:
    """Bytes needed to store ``num_elements`` values of ``dtype``, packed (int4: two per byte)."""
    return -(-num_elements * BITS_PER_ELEMENT[dtype] // 8)


def bytes_per_element(dtype: DType) -> float:
    return BITS_PER_ELEMENT[dtype] / 8
