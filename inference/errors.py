"""Domain exceptions of the inference package.

`inference/` never knows about HTTP: it raises these, and `api/` maps each class to a status code in
one place. Every message is meant to be shown to a person as it is, so it says what went wrong and,
where there is one, what to do about it.
"""

from __future__ import annotations


class ToonserveError(Exception):
    """Base class of every error raised on purpose by `inference/`."""


class ConversionError(ToonserveError):
    """A frozen `.pb` graph (or a converted file) is not a DCT-Net generator we can load exactly."""


class WeightsUnavailableError(ToonserveError):
    """A style's weights could not be found locally nor downloaded."""


class UnknownStyleError(ToonserveError):
    """A style name that is not in the registry."""


class InputShapeError(ToonserveError):
    """A tensor handed to a network does not satisfy its size contract."""
