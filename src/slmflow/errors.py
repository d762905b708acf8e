"""Errors a user can act on. Every layer raises these; the CLI and the server turn them into one line
or one OpenAI error envelope, never a traceback."""

from __future__ import annotations


class SlmflowError(Exception):
    """A problem with what the user asked for, described in one line."""


class InvalidRequest(SlmflowError):
    """A generation request that cannot be served as given (OpenAI `invalid_request_error`)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class Overloaded(SlmflowError):
    """The generation queue is full; the caller should retry later."""


class ConversionError(SlmflowError):
    """The ONNX Runtime GenAI model builder failed."""


class QualityBudgetExceeded(SlmflowError):
    """A conversion whose measured quality cost is over the budget the user set."""
