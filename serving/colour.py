"""Decoded pixels in the colours the pipeline wants: any Pillow mode to 8-bit RGB (or RGBA when really
transparent), 16-bit samples scaled (not clipped), floats brought to 0..255, CMYK and CIELab converted,
and an embedded colour profile converted to sRGB (an sRGB one, or an unreadable one, left alone)."""

from __future__ import annotations

import functools
import io
from typing import Final

import numpy as np
from PIL import Image, ImageCms


class UnsupportedPixelsError(Exception):
    """A pixel format Pillow cannot convert to RGB (the decoder reports it as an unsupported image)."""


_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# Modes Pillow converts to RGB/RGBA itself, correctly (alpha and palette transparency included).
_CONVERTIBLE_MODES: Final = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "YCbCr"})

# Modes whose embedded ICC profile (an RGB one) we convert to sRGB after the RGB(A) conversion.
RGB_FAMILY: Final = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "YCbCr"})


def converts_colours(im: Image.Image) -> bool:
    """Whether the image embeds a colour profile that decoding converts to sRGB."""
    icc = im.info.get("icc_profile")
    if not (isinstance(icc, bytes) and icc and im.mode in (*RGB_FAMILY, "CMYK")):
        return False
    return srgb_transform(icc, "CMYK" if im.mode == "CMYK" else "RGB") is not None


def to_pixels(im: Image.Image) -> np.ndarray:
    """A loaded image of any mode → (H, W, 3|4) uint8 sRGB, writable; RGBA only if not all opaque."""
    mode = im.mode
    icc = im.info.get("icc_profile")
    if mode in _SIXTEEN_BIT_MODES:
        return _grey16_to_pixels(im)
    if mode == "F":
        return _float_to_pixels(im)
    if mode == "CMYK":
        transform = srgb_transform(icc, "CMYK") if isinstance(icc, bytes) and icc else None
        rgb = ImageCms.applyTransform(im, transform) if transform is not None else im.convert("RGB")
        assert rgb is not None  # applyTransform returns an image unless inPlace=True
        return np.array(rgb)
    if mode == "LAB":
        # (TIFF CIELab.) Pillow's own LAB → RGB conversion does not convert the colours; littleCMS does.
        rgb = ImageCms.applyTransform(im, _lab_transform())
        assert rgb is not None
        return np.array(rgb)
    if mode not in _CONVERTIBLE_MODES:
        try:
            im = im.convert("RGB")
        except ValueError as exc:
            raise UnsupportedPixelsError(f"images with {mode} pixels are not supported") from exc
    out = im.convert("RGBA") if im.has_transparency_data else im
    if out.mode not in ("RGB", "RGBA"):
        out = out.convert("RGB")
    if mode in RGB_FAMILY and isinstance(icc, bytes) and icc:
        transform = srgb_transform(icc, out.mode)
        if transform is not None:
            converted = ImageCms.applyTransform(out, transform)
            assert converted is not None
            out = converted
    return drop_opaque_alpha(np.array(out))


def drop_opaque_alpha(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[2] == 4 and bool((pixels[:, :, 3] == 255).all()):
        return np.ascontiguousarray(pixels[:, :, :3])
    return pixels


def _grey16_to_pixels(im: Image.Image) -> np.ndarray:
    """16-bit grey (Pillow's I;16* and I, which it also uses for 16-bit PNG) → RGB(A), scaled.

    Pillow's own ``convert`` clips at 255; we map 0..65535 onto 0..255 with rounding (65535 → 255,
    32768 → 128). Values outside 0..65535 (32-bit "I" files) are clipped to that range first.
    """
    values = np.asarray(im).astype(np.int64)
    np.clip(values, 0, 65535, out=values)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    channels = [grey, grey, grey]
    transparent = im.info.get("transparency")
    if isinstance(transparent, int) and not isinstance(transparent, bool):
        # A 16-bit PNG's tRNS: one grey value (in file units) that is fully transparent.
        channels.append(np.where(np.asarray(im) == transparent, 0, 255).astype(np.uint8))
    return drop_opaque_alpha(np.stack(channels, axis=2))


def _float_to_pixels(im: Image.Image) -> np.ndarray:
    """32-bit float grey ("F", from TIFF): 0..1 if that is its range, else 0..255; NaN → 0."""
    values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size and float(values.max()) <= 1.0:
        values = values * 255.0
    grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


@functools.lru_cache(maxsize=16)
def srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached transform from an embedded ICC profile to sRGB for `mode` images ("RGB", "RGBA", or
    "CMYK" → "RGB"), or None when there is nothing to do: the profile is an sRGB one (most cameras
    embed one; converting would cost ~10 ms a megapixel for ±1 level), or it is unreadable or not for
    that colour space (an ICC profile is a hint about colours, never a reason to refuse an image).
    """
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        expected = "CMYK" if mode == "CMYK" else "RGB"
        if source.profile.xcolor_space.strip() != expected:
            return None
        if "srgb" in (source.profile.profile_description or "").lower():
            return None
        return ImageCms.buildTransform(
            source, _srgb_profile(), mode, "RGB" if mode == "CMYK" else mode, ImageCms.Intent.PERCEPTUAL
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def _lab_transform() -> ImageCms.ImageCmsTransform:
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
    return ImageCms.buildTransform(lab, _srgb_profile(), "LAB", "RGB", ImageCms.Intent.RELATIVE_COLORIMETRIC)
