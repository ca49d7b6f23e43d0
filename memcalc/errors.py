"""The exceptions the CLI turns into one-line messages and exit codes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


class MemcalcError(Exception):
    """A known failure with a message fit for the user. Exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class InputError(MemcalcError):
    """Bad input: unknown model, malformed config file, invalid option value."""

    exit_code = 2


@dataclass(frozen=True)
class Field:
    """A setting named inside a :class:`SettingsError`'s message."""

    name: str


class SettingsError(InputError, ValueError):
    """Settings that cannot hold. The message names its settings structurally, as :class:`Field`
    parts between text, so each front end writes them its own way: the CLI as the flags that set
    them (``--tp``), a scenario or settings file as its keys; ``str()`` uses the field names.

    A ValueError too, so pydantic reports one raised in a schema's checks with its location."""

    def __init__(self, *parts: str | Field) -> None:
        self.parts = parts
        super().__init__(self.describe())

    @property
    def fields(self) -> tuple[str, ...]:
        """The settings the message names, the one at fault first."""
        return tuple(part.name for part in self.parts if isinstance(part, Field))

    def describe(self, name: Callable[[str], str] = str) -> str:
        return "".join(name(part.name) if isinstance(part, Field) else part for part in self.parts)


class ToleranceExceeded(MemcalcError):
    """A validation run whose total missed the estimate by more than ``--tolerance``."""

    exit_code = 3


def describe_validation_error(error, prefix: str = "", names: dict[str, str] | None = None,
                              fields: tuple[str, ...] = ()) -> str:
    """One line from a pydantic ``ValidationError``: ``prefix: field.path: message; ...``.

    ``names`` renames top-level fields, e.g. ``batch_size`` to the ``--batch`` flag that set it.
    Unknown keys come first (a misspelt key also makes its field "required"), with the closest of
    ``fields`` suggested; pydantic's "Value error, " prefix on the schema's own checks is dropped."""
    import difflib

    names = names or {}
    unknown = ("extra_forbidden", "unexpected_keyword_argument")  # models and dataclasses say it differently
    items = sorted(error.errors(include_url=False), key=lambda item: item["type"] not in unknown)
    parts = []
    for item in items:
        location = ".".join(names.get(str(part), str(part)) if i == 0 else str(part) for i, part in enumerate(item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] in unknown and len(item["loc"]) == 1:
            close = difflib.get_close_matches(str(item["loc"][0]), fields, n=1)
            message += f" (did you mean {close[0]}?)" if close else ""
        parts.append(f"{location}: {message}" if location else message)
    text = "; ".join(parts)
    return f"{prefix}: {text}" if prefix else text
