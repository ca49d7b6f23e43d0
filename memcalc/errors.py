"""The exceptions the CLI turns into one-line messages and exit codes."""


class MemcalcError(Exception):
    """A known failure with a message fit for the user. Exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class InputError(MemcalcError):
    """Bad input: unknown model, malformed config file, invalid option value."""

    exit_code = 2


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
