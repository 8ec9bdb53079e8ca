"""What a job's result may take on disk, decided when its photo arrives (the job storage quota
reserves it until the result is written, then counts the result's real size).

The header alone only gives an upper bound: the result's pixels uncompressed. That is right for
noise and far too much for most photos; a solid-colour 40 MP picture, 1.6 KB as a lossless WebP,
would reserve 120 MB, so a handful of tiny files could fill the storage. So the photo is decoded at
a small scale (JPEG's DCT scaling, libvips' shrink-on-load: a fraction of a full decode), the sample
is encoded as the result will be, and its bytes per pixel, times the result's pixels and a margin,
is the reservation (never above the bound). A flat picture reserves little, a noisy one the bound.
A sample of a photo has more detail per pixel than the photo, so natural photos come out above
their real size; and a cartoon is flatter than its photo. Where a small decode is not possible (a
format decoded only in full, or a file larger than :data:`SAMPLE_MAX_BYTES`), the bound is reserved.
A result that is larger than its reservation all the same is still written and counted at its real
size: the reservation decides admission, never whether accepted work is kept.
"""

from __future__ import annotations

from typing import BinaryIO, Final

from inference.geometry import resize_rgb, to_rgb_array
from serving.encoding import encode
from serving.flow import output_shape
from serving.images import ImageError, ImageInfo, decode, plan_decode
from serving.options import ResolvedOptions

#: Long side of the sample a result's size is estimated from.
SAMPLE_SIDE: Final = 256
#: The estimate is the sample's bytes per pixel times this, times the result's pixels.
MARGIN: Final = 2.0
#: Bytes added to every estimate (container, headers, PNG filter bytes).
SLACK: Final = 64 * 1024
#: A sample decode may hold at most this many pixels (times the decoder's copies) at its peak;
#: formats that cannot be decoded small (BMP, TIFF, GIF, 16-bit PNG) reserve the bound instead.
SAMPLE_MAX_HELD: Final = 4 * 1024 * 1024
#: Largest file read to be sampled (it is read whole for the decode, one photo at a time).
SAMPLE_MAX_BYTES: Final = 16 * 1024 * 1024


def result_shape(info: ImageInfo, options: ResolvedOptions) -> tuple[int, int]:
    """(height, width) of the result of a photo of ``info``."""
    return output_shape((info.height, info.width), options.output_size) or (info.height, info.width)


def upper_bound(info: ImageInfo, options: ResolvedOptions) -> int:
    """The most a result can take: its pixels uncompressed, plus slack."""
    h, w = result_shape(info, options)
    return h * w * 3 + SLACK


def reserve(
    photo: BinaryIO,
    size: int,
    info: ImageInfo,
    options: ResolvedOptions,
    *,
    png_compression: int,
) -> int:
    """Bytes to reserve for the result of ``photo`` (``size`` bytes, already probed as ``info``),
    read from its start and left there. Blocking (decodes): call it off the event loop."""
    bound = upper_bound(info, options)
    needed = (SAMPLE_SIDE, SAMPLE_SIDE)
    if size > SAMPLE_MAX_BYTES or plan_decode(info, needed).held > SAMPLE_MAX_HELD:
        return bound
    photo.seek(0)
    data = photo.read(size + 1)
    photo.seek(0)
    if len(data) != size:  # changed under us: keep to what is sure
        return bound
    try:
        decoded = decode(data, max_pixels=info.width * info.height, needed=needed)
    except ImageError:
        return bound  # damage beyond the header: the item will fail and release it
    del data
    rgb = to_rgb_array(decoded.pixels)
    h, w = rgb.shape[:2]
    scale = min(1.0, SAMPLE_SIDE / max(h, w))
    if scale < 1.0:
        rgb = resize_rgb(rgb, max(1, round(h * scale)), max(1, round(w * scale)))
    sample = encode(rgb, options.format, options.quality, png_compression)
    per_pixel = len(sample) / (rgb.shape[0] * rgb.shape[1])
    rh, rw = result_shape(info, options)
    return min(bound, int(per_pixel * MARGIN * rh * rw) + SLACK)


#: What a video job's result reserves per output pixel of each frame, by kind of output: H.264 at
#: the lossy qualities (crf ≥ 18, :func:`serving.video.crf_for`), about 24 Mbit/s for 1080p at 30 fps
#: (twice what x264 writes at crf 18 for a busy phone clip; a cartoon's flat colours take less); and
#: lossless (``quality=100``, 4:4:4 RGB at qp 0), which keeps the steadied frames' noise.
VIDEO_BYTES_PER_PIXEL: Final = 0.05
LOSSLESS_VIDEO_BYTES_PER_PIXEL: Final = 1.5
#: While a clip runs its finished segments sit beside the result until they are joined: the
#: reservation covers both.
VIDEO_COPIES: Final = 2


def reserve_video(
    frames: int, display_size: tuple[int, int], options: ResolvedOptions, lossless_quality: int
) -> int:
    """Bytes a clip's result reserves: ``frames`` frames of the output size (the clip's
    ``display_size``, width × height, or ``options.output_size``), at the rate its quality writes,
    the segments beside it included (:data:`VIDEO_COPIES`). ``lossless_quality``: the quality that
    is lossless."""
    width, height = display_size
    oh, ow = output_shape((height, width), options.output_size) or (height, width)
    per_pixel = (
        LOSSLESS_VIDEO_BYTES_PER_PIXEL if options.quality >= lossless_quality else VIDEO_BYTES_PER_PIXEL
    )
    return int(frames * oh * ow * per_pixel * VIDEO_COPIES) + SLACK
