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


_SUFFIXES = {"": 1, "b": 1, "kib": 2**10, "kb": 10**3, "mib": 2**20, "mb": 10**6, "gib": 2**30, "gb": 10**9,
             "tib": 2**40, "tb": 10**12}


MAX_SIZE_BYTES = 2**60  # 1 EiB: past any GPU, node or cluster memory; a larger size is a typo


def parse_bytes(text: str) -> int:
    """A size such as ``4.6GiB``, ``500MiB``, ``80GB`` or ``1073741824`` as whole bytes (rounded
    down). Raises ValueError naming the accepted suffixes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    suffix = match.group(2).lower() if match else ""
    if not match or suffix not in _SUFFIXES:
        raise ValueError(f"{text!r} is not a size: a number with an optional unit "
                         f"({', '.join(s for s in ('B', 'KiB', 'KB', 'MiB', 'MB', 'GiB', 'GB', 'TiB', 'TB'))})")
    from decimal import Decimal

    try:
        amount = Decimal(match.group(1)) * _SUFFIXES[suffix]
    except ArithmeticError:  # decimal.Overflow past the context's exponent range
        amount = None
    if amount is None or amount > MAX_SIZE_BYTES:
        raise ValueError(f"{text!r} is larger than any memory memcalc sizes (at most 1 EiB)")
    return int(amount)
