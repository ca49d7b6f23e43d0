"""Display units. Internally every quantity is an integer number of bytes."""

from enum import StrEnum


class Unit(StrEnum):
    GIB = "gib"
    GB = "gb"
    MIB = "mib"
    MB = "mb"
    BYTES = "bytes"


UNIT_SIZE_BYTES: dict[Unit, int] = {
    Unit.GIB: 2**30,
    Unit.GB: 10**9,
    Unit.MIB: 2**20,
    Unit.MB: 10**6,
    Unit.BYTES: 1,
}

UNIT_LABEL: dict[Unit, str] = {
    Unit.GIB: "GiB",
    Unit.GB: "GB",
    Unit.MIB: "MiB",
    Unit.MB: "MB",
    Unit.BYTES: "bytes",
}


def format_bytes(num_bytes: int, unit: Unit, decimals: int = 2) -> str:
    """``num_bytes`` in ``unit`` without the label; bytes are printed with thousands separators."""
    if unit is Unit.BYTES:
        return f"{num_bytes:,}"
    return f"{num_bytes / UNIT_SIZE_BYTES[unit]:,.{decimals}f}"
