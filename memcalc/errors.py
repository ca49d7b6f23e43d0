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


def describe_validation_error(error, prefix: str = "", names: dict[str, str] | None = None) -> str:
    """One line from a pydantic ``ValidationError``: ``prefix: field.path: message; ...``.

    ``names`` renames top-level fields, e.g. ``batch_size`` to the ``--batch`` flag that set it."""
    names = names or {}
    parts = []
    for item in error.errors(include_url=False):
        location = ".".join(names.get(str(part), str(part)) if i == 0 else str(part) for i, part in enumerate(item["loc"]))
        message = item["msg"]
        parts.append(f"{location}: {message}" if location else message)
    text = "; ".join(parts)
    return f"{prefix}: {text}" if prefix else text
