"""Integer bounds for the schemas, shared by memcalc.config and memcalc.vision."""

from __future__ import annotations

from typing import Annotated


class _Bound:
    """A lower bound pydantic applies when it builds a schema (``gt``/``ge`` on the int schema,
    with its usual messages). Plain annotated_types metadata would do the same but cost its
    import on every start of the CLI, which never validates bundled models with pydantic."""

    def __init__(self, **bound: int) -> None:
        self.bound = bound

    def __get_pydantic_core_schema__(self, source, handler):
        schema = handler(source)
        schema.update(self.bound)
        return schema


PositiveInt = Annotated[int, _Bound(gt=0)]
NonNegativeInt = Annotated[int, _Bound(ge=0)]
# A dropout probability: 0 (off) up to, not including, 1 (pydantic's float schema takes ge/lt too)
Probability = Annotated[float, _Bound(ge=0, lt=1)]
# A share of a whole: above 0, up to 1 (partial_rotary_factor)
Fraction = Annotated[float, _Bound(gt=0, le=1)]
