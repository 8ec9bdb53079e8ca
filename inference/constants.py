"""The model's and the pipeline's constants: sizes, bounds, defaults and choices, each named once.

Torch-free (standard library only), so the request options, the settings and the jobs CLI take their
defaults and bounds from here without loading the model library.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

#: Upstream's processing size (short side), and the range we accept.
DEFAULT_PROCESSING_SIZE: Final = 720
MIN_PROCESSING_SIZE: Final = 64
MAX_PROCESSING_SIZE: Final = 2048
#: Upstream pads the background image to a multiple of this.
BACKGROUND_MULTIPLE: Final = 16
#: Most pixels the models run on (the processing image): 1536² by default. The pipeline's peak memory
#: grows by about 0.44 GB per million processing pixels in float32 on CPU (measured: 0.81 GB at 0.9 MP,
#: 1.44 GB at 2.4 MP, 2.14 GB at 4.2 MP, 2.78 GB at 5.6 MP, models included), so this keeps one image
#: under 1.5 GB whatever the photo's aspect ratio or the requested processing size.
DEFAULT_MAX_PROCESSING_PIXELS: Final = 1536 * 1536
#: Long side of a requested output size: at least this, at most that.
MIN_OUTPUT_SIDE: Final = 16
MAX_OUTPUT_SIDE: Final = 8192
#: Upstream keeps the 10 largest detections; we allow up to MAX_MAX_FACES.
DEFAULT_MAX_FACES: Final = 10
MAX_MAX_FACES: Final = 100
#: Smallest face box side (processing-image pixels) we stylise. Upstream: > 60 px in width or height.
DEFAULT_MIN_FACE_SIZE: Final = 40.0
#: Smallest detector score we stylise (the detector itself keeps faces above its own threshold).
DEFAULT_MIN_FACE_SCORE: Final = 0.9
#: Most images per background call. On CPU a batch of large images is slower per image than one at
#: a time (bf16 720×960: 197 ms alone, 239 ms/image in twos, 292 in fours: memory-bound), so 1 there.
DEFAULT_BG_BATCH: Final = 1
#: Most 288×288 crops per head call (per crop, CPU bf16: 17.8 ms alone, 19.9 ms in fours).
DEFAULT_HEAD_BATCH: Final = 16
#: Names of the timed stages, in order.
STAGES: Final = ("resize", "background", "detect", "align", "head", "blend", "strength", "resize_out")

NoFacePolicy = Literal["background", "error", "passthrough"]
NO_FACE_POLICIES: Final[tuple[NoFacePolicy, ...]] = get_args(NoFacePolicy)
#: Without a face: a cartoon of the whole photo, as upstream does.
DEFAULT_NO_FACE: Final[NoFacePolicy] = "background"
#: 1 = the model's output, 0 = the photo.
DEFAULT_STRENGTH: Final = 1.0

SkipReason = Literal["below_threshold", "too_small", "over_limit", "alignment_failed"]
SKIP_REASONS: Final[tuple[SkipReason, ...]] = get_args(SkipReason)
