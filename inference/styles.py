"""The styles: the seven official DCT-Net compound models on ModelScope, by name.

Torch-free, so that clients of the service (the jobs CLI) and the request options can name them
without loading the model library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from inference.errors import UnknownStyleError, shown


@dataclass(frozen=True)
class Style:
    """A DCT-Net compound model on ModelScope. ``revision=None`` means the hub's default branch."""

    name: str
    model_id: str
    revision: str | None
    description: str


def _style(name: str, suffix: str, description: str, revision: str | None = None) -> Style:
    return Style(name, f"damo/cv_unet_person-image-cartoon{suffix}_compound-models", revision, description)


#: The seven official styles. design and illustration only exist at revision v1.0.0 (docs/model.md §1).
STYLES: Final[dict[str, Style]] = {
    s.name: s
    for s in (
        _style("anime", "", "Japanese anime look; its head network got extra training"),
        _style("3d", "-3d", "3D-render look"),
        _style("handdrawn", "-handdrawn", "hand-drawn illustration"),
        _style("sketch", "-sketch", "pencil sketch"),
        _style("artstyle", "-artstyle", "painterly art style"),
        _style("design", "-sd-design", "Stable-Diffusion-distilled design style", "v1.0.0"),
        _style("illustration", "-sd-illustration", "Stable-Diffusion-distilled illustration", "v1.0.0"),
    )
}


def get_style(name: str) -> Style:
    """The registry entry for ``name``; :class:`UnknownStyleError` lists the valid names."""
    try:
        return STYLES[name]
    except KeyError:
        raise UnknownStyleError(f"unknown style {shown(name)}; choose one of: {', '.join(STYLES)}") from None
