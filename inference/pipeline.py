"""The DCT-Net portrait pipeline: background pass, every face aligned and stylised, blended back.

What upstream's ``ImageCartoonPipeline`` does (docs/model.md §4), with its silent cases made explicit:

1. ``resize``: the short side is brought down to the processing size (default 720, as upstream; up to
   2048 for more detail) with an area filter; smaller photos are not enlarged.
2. ``background``: the whole image through the background generator, in BGR, padded with white as
   upstream's ``padTo16x`` does (if either side is not a multiple of 16, *both* grow to the next
   multiple of 16 — a side that already fits grows by 16), the padding cropped off afterwards.
3. ``detect``: faces on the RGB processing image (:mod:`inference.faces`), then the policy: faces below
   ``min_face_score`` are skipped as ``below_threshold``, faces whose box is smaller than
   ``min_face_size`` as ``too_small``, and beyond the ``max_faces`` largest as ``over_limit``. Upstream
   drops faces of 60 px or less without a word; we stylise them down to ``min_face_size`` and report
   every skip.
4. ``align``: each face's 5 points → the official 288×288 crop (:mod:`inference.align`), white border,
   all crops in one batch.
5. ``head``: all crops through the head generator in **one** call (BGR in and out).
6. ``blend``: each head and the style's ``alpha.jpg`` mask warped back inside the face's footprint and
   blended ``m·head + (1-m)·result``, largest face first so smaller faces land on top (upstream order).
7. ``strength``: ``s·cartoon + (1-s)·photo`` (1 = the model's output, 0 = the photo), the cartoon
   taken as the uint8 image the model's output is, so that the same photo's :class:`Stages` kept
   from an earlier run give the same bytes at any strength (:func:`finish_stages`).
8. ``resize_out``: to the requested output size, by default the input's size, always (upstream does
   not resize back when no face is found).

RGB at the boundary; inside, the colour order of docs/model.md §4.4. Every stage is a method, timed
with the device synchronised, so the timings are what the stage cost.

On a GPU the image crosses to the device once, as uint8 at the processing size (or not at all when
the GPU decoder already put it there), and comes back once, as the uint8 result at the output size:
the float conversions, padding, colour flips, blend, strength and the resize to the output size all
run on the device, the resizes with the host's (OpenCV's) bytes (:mod:`inference.device_image`).
Besides the stage timer's synchronisations, only the face detector waits for the device (its
candidate counts decide the next step) and sends its few faces to the host. On the CPU the same
stages run on host tensors, the resizes by OpenCV itself.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
from torch import Tensor

from inference.align import CROP_SIZE, AlignmentError, Box, crop_matrices, paste_back_regions, warp_crops
from inference.constants import (
    DEFAULT_BG_BATCH,
    DEFAULT_HEAD_BATCH,
    DEFAULT_MAX_FACES,
    DEFAULT_MAX_PROCESSING_PIXELS,
    DEFAULT_MIN_FACE_SCORE,
    DEFAULT_MIN_FACE_SIZE,
    DEFAULT_NO_FACE,
    DEFAULT_PROCESSING_SIZE,
    DEFAULT_STRENGTH,
    MAX_MAX_FACES,
    MAX_OUTPUT_SIDE,
    MAX_PROCESSING_SIZE,
    MIN_PROCESSING_SIZE,
    NO_FACE_POLICIES,
    STAGES,
    NoFacePolicy,
    SkipReason,
)
from inference.device_image import resize_like_host, to_device
from inference.errors import OptionsError, ToonserveError
from inference.faces import DetectedFace, FaceDetector
from inference.faces.policy import choose_faces
from inference.geometry import (
    processing_shape,
    resize_out_on_device,
    resize_rgb,
    to_rgb_array,
    upstream_pad16,
)
from inference.models import LoadedStyle
from inference.tracking import FaceTracker
from inference.weights import WeightsKind

log = logging.getLogger(__name__)


class AbandonedError(ToonserveError):
    """The image's request was abandoned (deadline passed or client gone) before it was finished."""


class NoFaceError(ToonserveError):
    """No face to stylise and the caller asked for ``no_face="error"``."""


class PipelineError(ToonserveError):
    """An unexpected failure inside one stage for one image (a bug or a device fault, not the input).

    The image fails alone: its batch neighbours go on. The message names the stage; the traceback
    is logged where it happened.
    """


@dataclass(frozen=True)
class Options:
    """Per-request knobs. ``output_size`` is (height, width); None keeps the input's size.

    ``input_size``: the photo's own (height, width) when the image handed to the pipeline is a
    reduced copy of it (decoded at a reduced scale, or already brought to the processing size):
    the processing size, the default output size and the reported face positions are then those of
    the photo, not of the copy. ``max_processing_pixels`` caps the processing image's area: a photo
    whose processing size would exceed it is shrunk further, keeping its aspect ratio.
    ``device_result``: also keep the result on the device, as :attr:`Result.device_image` (on a
    GPU, for an encoder there); the host copy in :attr:`Result.image` is made either way.
    ``resize_later``: on the CPU, leave the resize to the output size to the caller (the request
    flow does it on its codec threads, beside the next image's model work, rather than on the
    worker): :attr:`Result.image` is then at the processing size, :attr:`Result.output_size` what it
    is to become. Elsewhere the resize stays on the device.
    ``keep_stages``: also hand back what the models made of the photo (:attr:`Result.stages`, on the
    host), from which :func:`finish_stages` makes the result at another strength or output size
    without running them again (the request flow's result cache).
    ``tracker``: the image is a frame of a clip, at ``time_s`` seconds in it: its detected faces are
    handed to the clip's :class:`~inference.tracking.FaceTracker` (frames in order; ``shot`` counts
    the cuts before it, and a new shot starts new tracks) and replaced by their tracked, smoothed
    selves, so the head crops do not jitter from frame to frame.
    """

    processing_size: int = DEFAULT_PROCESSING_SIZE
    strength: float = DEFAULT_STRENGTH
    output_size: tuple[int, int] | None = None
    no_face: NoFacePolicy = DEFAULT_NO_FACE
    min_face_size: float = DEFAULT_MIN_FACE_SIZE
    min_face_score: float = DEFAULT_MIN_FACE_SCORE
    max_faces: int = DEFAULT_MAX_FACES
    input_size: tuple[int, int] | None = None
    max_processing_pixels: int = DEFAULT_MAX_PROCESSING_PIXELS
    device_result: bool = False
    resize_later: bool = False
    keep_stages: bool = False
    tracker: FaceTracker | None = field(default=None, compare=False)
    time_s: float = 0.0
    shot: int = 0

    def __post_init__(self) -> None:
        if not MIN_PROCESSING_SIZE <= self.processing_size <= MAX_PROCESSING_SIZE:
            raise OptionsError(
                f"processing_size must be in [{MIN_PROCESSING_SIZE}, {MAX_PROCESSING_SIZE}], "
                f"got {self.processing_size}"
            )
        if not (math.isfinite(self.strength) and 0.0 <= self.strength <= 1.0):
            raise OptionsError(f"strength must be in [0, 1], got {self.strength}")
        if self.output_size is not None and not all(0 < v <= MAX_OUTPUT_SIDE for v in self.output_size):
            raise OptionsError(
                f"output_size must be positive and at most {MAX_OUTPUT_SIDE}, got {self.output_size}"
            )
        if self.no_face not in NO_FACE_POLICIES:
            raise OptionsError(f"no_face must be one of {', '.join(NO_FACE_POLICIES)}, got {self.no_face!r}")
        if not (math.isfinite(self.min_face_size) and self.min_face_size >= 0):
            raise OptionsError(f"min_face_size must be a non-negative number, got {self.min_face_size}")
        if not 0.0 <= self.min_face_score <= 1.0:
            raise OptionsError(f"min_face_score must be in [0, 1], got {self.min_face_score}")
        if not 0 <= self.max_faces <= MAX_MAX_FACES:
            raise OptionsError(f"max_faces must be in [0, {MAX_MAX_FACES}], got {self.max_faces}")
        if self.max_processing_pixels < MIN_PROCESSING_SIZE**2:
            least = MIN_PROCESSING_SIZE**2
            raise OptionsError(
                f"max_processing_pixels must be at least {least}, got {self.max_processing_pixels}"
            )

    def processing_shape(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) a photo of ``input_size`` is processed at with these options."""
        return processing_shape(*input_size, self.processing_size, self.max_processing_pixels)


@dataclass(frozen=True)
class FaceReport:
    """A detected face, in input-image pixels. ``reason`` is None when it was stylised."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    stylized: bool
    reason: SkipReason | None = None


@dataclass(frozen=True)
class Stages:
    """What the models made of one photo, before strength and the output size: enough to finish the
    photo again at any strength, no-face policy that the faces allow, and output size
    (:func:`finish_stages`), giving the bytes a run would give."""

    #: (h, w, 3) uint8 RGB: the photo at its processing size.
    photo: np.ndarray
    #: (h, w, 3) uint8 RGB: the cartoon at the processing size (heads blended in; the background
    #: pass alone when no face was stylised); None when the background pass did not run (no face to
    #: stylise and the policy did not need it).
    cartoon: np.ndarray | None
    faces: tuple[FaceReport, ...]
    #: How many faces were stylised.
    stylized: int
    input_size: tuple[int, int]
    style: str
    device: str
    dtype: str
    weights: WeightsKind

    @property
    def nbytes(self) -> int:
        """Memory the kept pixels hold."""
        return self.photo.nbytes + (self.cartoon.nbytes if self.cartoon is not None else 0)

    def serves(self, no_face: NoFacePolicy) -> bool:
        """Whether these stages can finish a request with this no-face policy (without faces, the
        ``background`` policy needs the background pass, which may not have run)."""
        return self.stylized > 0 or no_face != "background" or self.cartoon is not None


@dataclass
class Result:
    """The cartoon (H, W, 3) uint8 RGB and what happened on the way."""

    image: np.ndarray
    style: str
    faces: list[FaceReport]
    input_size: tuple[int, int]
    processing_size: tuple[int, int]
    output_size: tuple[int, int]
    device: str
    dtype: str
    #: What was returned when no face was stylised: "background" | "passthrough" | None (faces found).
    no_face: NoFacePolicy | None
    #: The style's weights: a real model's (``modelscope``) or demo weights (not real cartoons).
    weights: WeightsKind = "modelscope"
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: The same image as (3, H, W) uint8 RGB on the pipeline's device, when the options asked for it
    #: (``device_result``) and the device is not the CPU; None otherwise.
    device_image: Tensor | None = field(default=None, repr=False, compare=False)
    #: What the models made of the photo, when the options asked for it (``keep_stages``).
    stages: Stages | None = field(default=None, repr=False, compare=False)
    #: When each stage ran: (stage, start, end) in Unix-epoch nanoseconds, in order (a batched stage's
    #: interval is its batch's), for trace spans.
    stage_times: tuple[tuple[str, int, int], ...] = field(default=(), repr=False, compare=False)

    @property
    def faces_stylized(self) -> int:
        return sum(f.stylized for f in self.faces)


@dataclass
class _Work:
    """The state one image carries through the stages."""

    #: Input, (H, W, 3) uint8 RGB: a host array, or a tensor already on the device (GPU decode).
    rgb: np.ndarray | Tensor
    options: Options
    timings: dict[str, float] = field(default_factory=dict)
    #: (stage, start, end) in Unix-epoch nanoseconds, as the stages ran.
    stage_times: list[tuple[str, int, int]] = field(default_factory=list)
    photo_t: Tensor | None = None  # processing image, (3, h, w) uint8 RGB on the device
    result_t: Tensor | None = None  # (3, h, w) float32 BGR 0..255 on the device
    faces: list[FaceReport] = field(default_factory=list)
    chosen: list[DetectedFace] = field(default_factory=list)
    #: For each chosen face, its index in ``faces`` (to report a face that could not be aligned).
    chosen_index: list[int] = field(default_factory=list)
    crops: Tensor | None = None
    inverses: np.ndarray | None = None
    heads: Tensor | None = None
    #: Set when a stage failed for this image; it goes no further.
    error: ToonserveError | None = None

    @property
    def input_size(self) -> tuple[int, int]:
        """The photo's (height, width): given in the options when ``rgb`` is a reduced copy."""
        return self.options.input_size or (self.rgb.shape[0], self.rgb.shape[1])


def _stage_error(stage: str, exc: Exception) -> ToonserveError:
    """What one image gets when ``stage`` raised ``exc`` for it: a domain error as it is, anything
    else (a bug, a device fault) as a :class:`PipelineError`, with the traceback logged here."""
    if isinstance(exc, ToonserveError):
        return exc
    log.error("the %s stage failed for one image", stage, exc_info=exc)
    return PipelineError(f"internal error in the {stage} stage ({type(exc).__name__}); see the server log")


class Cartoonizer:
    """Runs one style's compound model on its device. Stage methods are public for tests/benchmarks.

    :meth:`run_many` processes several images stage by stage, so the generator sees batches: every
    head crop of every image in one call (up to ``head_batch`` crops a call), and the background
    passes of images of the same padded size together (up to ``bg_batch`` a call). A batched stage's
    time is charged in full to each image in the batch (it is the time each of them waited for it).
    A stage that fails for one image fails that image alone (a batched call that fails is run again
    one image at a time, so the culprit is found and its neighbours finish).
    """

    def __init__(
        self,
        style: LoadedStyle,
        detector: FaceDetector,
        bg_batch: int = DEFAULT_BG_BATCH,
        head_batch: int = DEFAULT_HEAD_BATCH,
    ) -> None:
        if bg_batch < 1 or head_batch < 1:
            raise OptionsError(f"batch sizes must be at least 1, got bg {bg_batch}, head {head_batch}")
        self.style = style
        self.detector = detector
        self.bg_batch = bg_batch
        self.head_batch = head_batch
        self.device = style.bg.device
        self.dtype = style.bg.dtype
        #: The crop pixels where the style's mask is not 0 (found once: on a GPU it waits for it).
        self._mask_support = mask_support(style.mask)

    @contextmanager
    def _timed(self, batch: Sequence[_Work], stage: str) -> Iterator[None]:
        """Time a stage with the device synchronised before and after, so the time is the stage's.
        On CUDA only this thread's stream is waited for: a device-wide synchronisation would also
        wait for the GPU decodes and encodes the codec threads run on their own streams."""
        sync = torch.cuda.current_stream(self.device).synchronize if self.device.type == "cuda" else None
        if sync:
            sync()
        start, start_ns = time.perf_counter(), time.time_ns()
        yield
        if sync:
            sync()
        elapsed = (time.perf_counter() - start) * 1000
        end_ns = start_ns + round(elapsed * 1e6)
        for work in batch:
            work.timings[stage] = work.timings.get(stage, 0.0) + elapsed
            work.stage_times.append((stage, start_ns, end_ns))

    @torch.inference_mode()
    def warm_up(self, height: int, width: int) -> None:
        """A blank ``height × width`` photo through the pipeline (background pass, detector), then a
        blank face crop through the head network: what the first photos of that size would otherwise
        pay for (their buffers touched for the first time, kernels chosen for their shapes)."""
        self.run(np.full((height, width, 3), 128, dtype=np.uint8), Options(no_face="background"))
        self.style.head(torch.full((1, 3, CROP_SIZE, CROP_SIZE), 128.0, device=self.device))

    def run(self, image: np.ndarray | Tensor, options: Options | None = None) -> Result:
        """(H, W[, C]) uint8 image (RGB, grey or with alpha; or an (H, W, 3) uint8 RGB tensor) →
        :class:`Result`; raises domain errors."""
        outcome = self.run_many([(image, options or Options())])[0]
        if isinstance(outcome, ToonserveError):
            raise outcome
        return outcome

    def run_many(
        self,
        items: Sequence[tuple[np.ndarray | Tensor, Options]],
        alive: Callable[[int], bool] = lambda _: True,
    ) -> list[Result | ToonserveError]:
        """Several images, batched stage by stage. Each outcome is a Result or the domain error of
        that image alone. ``alive(i)`` is asked between stages; an image that is no longer wanted
        (deadline passed, client gone) stops there and gets a :class:`AbandonedError`.

        An image is a host array (any of :func:`to_rgb_array`'s layouts) or an (H, W, 3) uint8 RGB
        tensor, which may already be on the device (the GPU decoder's output): it is not copied
        back to the host.
        """
        outcomes: dict[int, Result | ToonserveError] = {}
        batch: dict[int, _Work] = {}
        for i, (image, options) in enumerate(items):
            try:
                batch[i] = _Work(self._input(image), options)
            except ToonserveError as exc:
                outcomes[i] = exc

        def live() -> list[_Work]:
            for i, work in list(batch.items()):
                if work.error is not None:
                    outcomes[i] = work.error
                    del batch[i]
                elif not alive(i):
                    outcomes[i] = AbandonedError("the request was cancelled before its image was finished")
                    del batch[i]
            return list(batch.values())

        with torch.inference_mode():
            for work in live():
                self._guard([work], "resize", lambda js: self.resize(js[0]))
                self._guard([work], "detect", lambda js: self.detect(js[0]))
            # Without a face to stylise, "error" and "passthrough" need no background pass.
            self.background([j for j in live() if j.chosen or j.options.no_face == "background"])
            for work in [j for j in live() if j.chosen]:
                self._guard([work], "align", lambda js: self.align(js[0]))
            with_faces = [j for j in live() if j.chosen]
            self._guard(with_faces, "head", self.head)
            for work in [j for j in live() if j.chosen]:
                self._guard([work], "blend", lambda js: self.blend(js[0]))
            for i, work in list(batch.items()):
                if work.error is not None:
                    outcomes[i] = work.error
                    continue
                try:
                    outcomes[i] = self.finish(work)
                except Exception as exc:
                    outcomes[i] = _stage_error("finish", exc)
        return [outcomes[i] for i in range(len(items))]

    def _input(self, image: np.ndarray | Tensor) -> np.ndarray | Tensor:
        if not isinstance(image, Tensor):
            return to_rgb_array(image)
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise OptionsError(
                f"an image tensor must be (H, W, 3) uint8 RGB, got {tuple(image.shape)} {image.dtype}"
            )
        return image.to(self.device)

    def _guard(self, batch: Sequence[_Work], stage: str, run: Callable[[Sequence[_Work]], None]) -> None:
        """``run(batch)``; if it raises, once more for each image alone, so only the culprit fails."""
        if not batch:
            return
        try:
            run(batch)
            return
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = _stage_error(stage, exc)
                return
        for work in batch:
            try:
                run([work])
            except Exception as exc:
                work.error = _stage_error(stage, exc)

    # -- stages ------------------------------------------------------------------------------------

    def resize(self, work: _Work) -> None:
        """The processing image on the device: a host image is resized on the host (usually already
        done: the flow decodes to the processing size) and copied over once; a tensor already on
        the device (the GPU decoder's) is resized there, to the same bytes (:mod:`inference.device_image`)."""
        with self._timed([work], "resize"):
            h, w = work.options.processing_shape(work.input_size)
            if isinstance(work.rgb, Tensor):
                work.photo_t = resize_like_host(work.rgb.permute(2, 0, 1), h, w)
            elif self.device.type == "cpu":
                work.photo_t = torch.from_numpy(resize_rgb(work.rgb, h, w)).permute(2, 0, 1)
            else:
                work.photo_t = to_device(resize_rgb(work.rgb, h, w), self.device).permute(2, 0, 1)

    def background(self, batch: Sequence[_Work]) -> None:
        """The background pass; images of the same padded size share generator calls."""
        groups: dict[tuple[int, int], list[_Work]] = {}
        for work in batch:
            assert work.photo_t is not None
            groups.setdefault(upstream_pad16(*work.photo_t.shape[1:]), []).append(work)
        for (ph, pw), group in groups.items():
            for start in range(0, len(group), self.bg_batch):
                chunk = group[start : start + self.bg_batch]
                self._guard(chunk, "background", functools.partial(self._background_call, size=(ph, pw)))

    def _background_call(self, chunk: Sequence[_Work], size: tuple[int, int]) -> None:
        """One generator call for images that pad to ``size`` (height, width)."""
        ph, pw = size
        with self._timed(chunk, "background"):
            bgr = torch.full((len(chunk), 3, ph, pw), 255, dtype=torch.uint8, device=self.device)
            for k, work in enumerate(chunk):
                assert work.photo_t is not None
                _, h, w = work.photo_t.shape
                bgr[k, :, :h, :w] = work.photo_t.flip(0)  # RGB → BGR
            out = self.style.bg(bgr)
            for k, work in enumerate(chunk):
                assert work.photo_t is not None
                _, h, w = work.photo_t.shape
                work.result_t = out[k, :, :h, :w].float()

    def detect(self, work: _Work) -> None:
        assert work.photo_t is not None
        opts = work.options
        with self._timed([work], "detect"):
            found = self.detector.detect(work.photo_t)
            if opts.tracker is not None:
                found = [face for _, face in opts.tracker.update(found, opts.time_s, opts.shot)]
        chosen, reasons = choose_faces(found, opts.min_face_score, opts.min_face_size, opts.max_faces)
        work.chosen_index = chosen
        work.chosen = [found[i] for i in chosen]
        # Reported in the photo's own pixels (the detector saw the processing image).
        scale_y = work.input_size[0] / work.photo_t.shape[1]
        scale_x = work.input_size[1] / work.photo_t.shape[2]
        for i, face in enumerate(found):
            x1, y1, x2, y2 = face.box
            work.faces.append(
                FaceReport(
                    box=(x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y),
                    score=float(face.score),
                    landmarks=tuple((float(x) * scale_x, float(y) * scale_y) for x, y in face.landmarks),
                    stylized=i not in reasons,
                    reason=reasons.get(i),
                )
            )

    def align(self, work: _Work) -> None:
        """Each chosen face → its 288×288 crop; a face whose landmarks admit no crop (degenerate
        points) is reported as ``alignment_failed`` and left out, the others go on."""
        assert work.photo_t is not None
        with self._timed([work], "align"):
            forward, inverse, kept = [], [], []
            for face, index in zip(work.chosen, work.chosen_index, strict=True):
                try:
                    tfm, tfm_inv = crop_matrices(face.landmarks)
                except AlignmentError:
                    work.faces[index] = replace(work.faces[index], stylized=False, reason="alignment_failed")
                    continue
                forward.append(tfm)
                inverse.append(tfm_inv)
                kept.append((face, index))
            work.chosen = [face for face, _ in kept]
            work.chosen_index = [index for _, index in kept]
            if not kept:
                return
            work.inverses = np.stack(inverse)
            # cv2.warpAffine on uint8 rounds; so do we, to feed the head network what upstream fed it.
            work.crops = warp_crops(work.photo_t, np.stack(forward)).round_().clamp_(0, 255)

    def head(self, batch: Sequence[_Work]) -> None:
        """Every aligned crop of every image through the head network, ``head_batch`` crops a call."""
        if not batch:
            return
        with self._timed(batch, "head"):
            crops = torch.cat([j.crops for j in batch if j.crops is not None]).flip(1)  # RGB → BGR
            heads = torch.cat(
                [
                    self.style.head(crops[k : k + self.head_batch])
                    for k in range(0, len(crops), self.head_batch)
                ]
            )
            for work, part in zip(batch, torch.split(heads, [len(j.chosen) for j in batch]), strict=True):
                work.heads = part  # uint8 BGR

    def blend(self, work: _Work) -> None:
        """Each head and the mask warped back and blended, ``m·head + (1 - m)·result``, in place,
        largest face first. Only where the mask can land (:attr:`_mask_support`): elsewhere the
        blend would leave the result as it is (``m = 0``)."""
        assert work.heads is not None and work.result_t is not None and work.inverses is not None
        with self._timed([work], "blend"):
            result = work.result_t
            mask = self.style.mask.to(torch.float32).expand(len(work.chosen), 1, CROP_SIZE, CROP_SIZE)
            layers = torch.cat([work.heads.float(), mask], dim=1)
            size = (result.shape[1], result.shape[2])
            for patch in paste_back_regions(layers, work.inverses, size, self._mask_support):
                if patch.box.is_empty:
                    continue
                region = result[(slice(None), *patch.box.slices)]
                head, m = patch.values[:3], patch.values[3:]
                region.mul_(1.0 - m).add_(head.mul_(m))  # the patch is ours: m·head in place

    def finish(self, work: _Work) -> Result:
        """Apply the no-face policy and strength, resize out, and report.

        Off the CPU, everything up to the output size stays on the device (the resize to the
        output size gives the host's bytes there: :mod:`inference.device_image`), and the uint8 result
        is copied to the host once, at the end.
        """
        assert work.photo_t is not None
        opts = work.options
        policy = _policy(len(work.chosen), len(work.faces), opts.no_face)
        on_cpu = self.device.type == "cpu"
        with self._timed([work], "strength"):
            # The model's output as the uint8 image it is (what Stages keep), then the strength.
            cartoon = None
            if work.result_t is not None and on_cpu:
                # Written straight into an (h, w, 3) array, BGR → RGB on the way: the photo is an
                # (h, w, 3) array's view too, so the strength keeps that layout, and the result and
                # the kept stages need no transposing copy (the same values as the path below).
                cartoon = _rgb_hwc_uint8_host(work.result_t).permute(2, 0, 1)
            elif work.result_t is not None:
                cartoon = work.result_t.flip(0).round_().clamp_(0, 255).to(torch.uint8)  # BGR → RGB
            out_u8 = _apply_strength(work.photo_t, cartoon, policy, opts.strength)
            if on_cpu:
                out = out_u8.permute(1, 2, 0).numpy()
        oh, ow = opts.output_size or work.input_size
        device_image = None
        with self._timed([work], "resize_out"):
            if on_cpu and opts.resize_later:
                out = np.ascontiguousarray(out)
            elif on_cpu:
                out = np.ascontiguousarray(resize_rgb(out, oh, ow))
            else:
                out, device_image = resize_out_on_device(out_u8, oh, ow, keep=opts.device_result)
        stages = None
        if opts.keep_stages:
            stages = Stages(
                photo=_host_hwc(work.photo_t),
                cartoon=_host_hwc(cartoon) if cartoon is not None else None,
                faces=tuple(work.faces),
                stylized=len(work.chosen),
                input_size=work.input_size,
                style=self.style.name,
                device=str(self.device),
                dtype=str(self.dtype).removeprefix("torch."),
                weights=self.style.weights.kind,
            )
        for stage in STAGES:
            work.timings.setdefault(stage, 0.0)
        return Result(
            image=out,
            style=self.style.name,
            faces=work.faces,
            input_size=work.input_size,
            processing_size=(work.photo_t.shape[1], work.photo_t.shape[2]),
            output_size=(oh, ow),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            no_face=policy,
            weights=self.style.weights.kind,
            timings_ms={s: round(work.timings[s], 3) for s in STAGES},
            device_image=device_image,
            stages=stages,
            stage_times=tuple(work.stage_times),
        )


def mask_support(mask: Tensor) -> Box:
    """The box of a (288, 288) mask's non-zero values, in crop pixels (empty for an all-zero mask)."""
    rows = torch.nonzero(mask.amax(dim=1) > 0).flatten().tolist()
    cols = torch.nonzero(mask.amax(dim=0) > 0).flatten().tolist()
    if not rows:
        return Box(0, 0, 0, 0)
    return Box(top=rows[0], left=cols[0], bottom=rows[-1] + 1, right=cols[-1] + 1)


def _policy(stylized: int, found: int, no_face: NoFacePolicy) -> NoFacePolicy | None:
    """The no-face policy that makes the result (None: faces were stylised); raises
    :class:`NoFaceError` for ``error``."""
    if stylized:
        return None
    if no_face == "error":
        detail = f"{found} face(s) found but none stylisable" if found else "no face found"
        raise NoFaceError(f"{detail} and no_face='error' was requested")
    return no_face


def _apply_strength(
    photo: Tensor, cartoon: Tensor | None, policy: NoFacePolicy | None, strength: float
) -> Tensor:
    """(3, h, w) uint8 RGB: ``strength·cartoon + (1-strength)·photo``, rounded; the photo itself for
    ``passthrough`` or strength 0. ``photo`` and ``cartoon``: (3, h, w) uint8 RGB on one device."""
    if policy == "passthrough" or strength == 0.0:
        return photo
    assert cartoon is not None, "the background pass ran for this policy"
    if strength == 1.0:
        return cartoon
    return torch.lerp(photo.float(), cartoon.float(), strength).round_().clamp_(0, 255).to(torch.uint8)


def _rgb_hwc_uint8_host(bgr: Tensor) -> Tensor:
    """(3, h, w) float32 BGR on the CPU, the result's values (the background pass's uint8 values with
    heads blended in by weights in [0, 1]: none below -0.5, whatever the float rounding) → a
    contiguous (h, w, 3) uint8 RGB tensor, rounded half to even and clamped to 0..255, as the
    device path's ``round_().clamp_(0, 255)``. Where the values lie as an (h, w, 3) array's rows
    (the background pass's channels-last output), OpenCV does it in two vector passes,
    ``convertScaleAbs`` (``|x|`` rounded and saturated: the same for every value above -0.5) then
    the channel flip: 0.5 ms at 720×960 where torch's five passes take 1.7 (one thread) or 1.1
    (two); other layouts go the torch way."""
    hwc = bgr.permute(1, 2, 0)
    if bgr.dtype == torch.float32 and hwc.stride(2) == 1 and hwc.stride(1) == 3:
        return torch.from_numpy(cv2.cvtColor(cv2.convertScaleAbs(hwc.numpy()), cv2.COLOR_BGR2RGB))
    return _rgb_hwc_uint8(bgr.round_().clamp_(0, 255))


def _rgb_hwc_uint8(bgr: Tensor) -> Tensor:
    """(3, h, w) float BGR holding values in [0, 255] → a contiguous (h, w, 3) uint8 RGB tensor
    (truncating, as ``Tensor.to(torch.uint8)``), one channel at a time: no float copy of the whole
    image on the way."""
    out = torch.empty((bgr.shape[1], bgr.shape[2], 3), dtype=torch.uint8, device=bgr.device)
    for k in range(3):
        out[:, :, k].copy_(bgr[2 - k])
    return out


def _host_hwc(image: Tensor) -> np.ndarray:
    """(3, h, w) uint8 on any device → a (h, w, 3) uint8 host array of its own."""
    return np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())


def finish_stages(stages: Stages, options: Options) -> Result:
    """The result a run with ``options`` would give, made from the :class:`Stages` an earlier run of
    the same photo (same style, weights and processing size) kept: only the strength and the resize
    to the output size run, on the host. Raises :class:`NoFaceError` as a run would, and
    :class:`~inference.errors.OptionsError` when the stages cannot serve ``options.no_face``
    (:meth:`Stages.serves`)."""
    if not stages.serves(options.no_face):
        raise OptionsError("these stages lack the background pass that no_face='background' needs")
    timings = dict.fromkeys(STAGES, 0.0)
    policy = _policy(stages.stylized, len(stages.faces), options.no_face)
    start = time.perf_counter()
    photo = torch.from_numpy(stages.photo).permute(2, 0, 1)
    cartoon = torch.from_numpy(stages.cartoon).permute(2, 0, 1) if stages.cartoon is not None else None
    with torch.inference_mode():
        out = _apply_strength(photo, cartoon, policy, options.strength).permute(1, 2, 0).numpy()
    timings["strength"] = (time.perf_counter() - start) * 1000
    oh, ow = options.output_size or stages.input_size
    start = time.perf_counter()
    if not options.resize_later:
        out = resize_rgb(out, oh, ow)
    out = np.ascontiguousarray(out)
    timings["resize_out"] = (time.perf_counter() - start) * 1000
    return Result(
        image=out,
        style=stages.style,
        faces=list(stages.faces),
        input_size=stages.input_size,
        processing_size=(stages.photo.shape[0], stages.photo.shape[1]),
        output_size=(oh, ow),
        device=stages.device,
        dtype=stages.dtype,
        no_face=policy,
        weights=stages.weights,
        timings_ms={s: round(v, 3) for s, v in timings.items()},
        stages=stages,
    )
