"""Domain exceptions of the inference package.

`inference/` never knows about HTTP: it raises these, and `api/` maps each class to a status code in
one place. Every message is meant to be shown to a person as it is, so it says what went wrong and,
where there is one, what to do about it.
"""

from __future__ import annotations

#: Longest piece of a client's input repeated in an error message.
ECHO_LIMIT = 64


def shown(value: object) -> str:
    """``repr(value)`` for an error message, cut to :data:`ECHO_LIMIT` characters with the length
    said, so a megabyte sent in a field does not come back in the answer."""
    text = repr(value)
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[:ECHO_LIMIT]}… ({len(str(value))} characters)"


class ToonserveError(Exception):
    """Base class of every error raised on purpose by `inference/`.

    ``retry_after``: for errors that pass (a full queue, a style still loading), the seconds after
    which trying again makes sense; None for errors that trying again will not fix.
    """

    retry_after: int | None = None


class OptionsError(ToonserveError):
    """A request option out of range (a processing size, a strength, an output size …)."""


class ConfigurationError(ToonserveError):
    """A setting that cannot work on this machine (a device that does not exist, an unknown dtype)."""


class ConversionError(ToonserveError):
    """A frozen `.pb` graph (or a converted file) is not a DCT-Net generator we can load exactly."""


class WeightsUnavailableError(ToonserveError):
    """A style's weights could not be found locally nor downloaded."""


class UnknownStyleError(ToonserveError):
    """A style name that is not in the registry."""


class InputShapeError(ToonserveError):
    """A tensor handed to a network does not satisfy its size contract."""


class StyleUnavailableError(ToonserveError):
    """A configured style that cannot serve now: its weights failed to load (retried in the
    background) — the message says why and how to fix it."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StyleLoadingError(StyleUnavailableError):
    """A configured style that is still loading (start-up, or a retry under way)."""
