"""The request options as command-line flags, for both CLIs (``toonserve cartoonize`` and ``toonserve
jobs submit``): one flag per field of :class:`~serving.options.RequestOptions`, its type, choices and
help taken from the field, so a new option is a new flag without touching this module.

Torch-free, like :mod:`serving.options`: the jobs CLI is a client of the service.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Literal, Union, get_args, get_origin

from inference.styles import STYLES
from serving.options import OPTION_NAMES, RequestOptions

#: Choices a field's type does not carry (its values are checked by the server or the engine).
_CHOICES: dict[str, tuple[str, ...]] = {"style": tuple(STYLES)}


def _flag_type(annotation: Any) -> tuple[type[Any], tuple[Any, ...] | None]:
    """The argparse type and choices of a field annotated ``T``, ``T | None`` or ``Literal[…]``."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """``--style``, ``--strength``, ``--processing-size`` … (every request option; left out: the
    service's default)."""
    for name in OPTION_NAMES:
        field = RequestOptions.model_fields[name]
        kind, choices = _flag_type(field.annotation)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            choices=_CHOICES.get(name, choices),
            default=None,
            help=field.description,
        )


def options_from(args: argparse.Namespace) -> RequestOptions:
    """The options the flags give; :class:`~inference.errors.OptionsError` for one out of range."""
    return RequestOptions.make(**{n: getattr(args, n) for n in OPTION_NAMES if getattr(args, n) is not None})
