"""User-facing errors: one line that names the input and says what to do."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or gave us; printed as one line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and its hint as a single line (line breaks of wrapped library messages
        folded into spaces)."""
        text = f"{self.message} ({self.hint})" if self.hint else self.message
        return " ".join(text.split())


class VerificationError(UserError):
    """The artifact does not match the original model within tolerance."""

    exit_code = 3


def describe_validation_error(error) -> str:
    """A pydantic ValidationError as "key 'a.b': what was expected (and N more)"."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    extra = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"key '{key}': {message}{extra}"
