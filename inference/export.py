"""Export a style's two generators to ONNX with the official frozen graphs' interface.

Each exported file computes what the official ``cartoon_h.pb`` / ``cartoon_bg.pb`` compute
(docs/model.md §2.1, §8): input ``input_image``, float32 ``[H, W, 3]`` BGR 0..255 without a batch
axis; inside, ``x = input / 127.5 - 1``, the U-Net, the guided filter (r=1, the graph's eps, box
means normalised by ``box(ones)`` as the graph does it), the clip to ±0.999999, ``(z + 1) * 127.5``
and the truncating cast; output ``output_image``, uint8 ``[H, W, 3]`` BGR 0..254. Code written for
the ``.pb`` therefore runs the ``.onnx`` unchanged. H and W are dynamic and, as in the TF graph,
must be positive multiples of 4 (:data:`~inference.dctnet.SIZE_MULTIPLE`); ONNX Runtime refuses
other sizes with a shape error, as TensorFlow does.

The graph is traced from our PyTorch generator in float32 through its plain modules (not the oneDNN
path) by ``torch.onnx.export`` with the ``torch.export``-based exporter (``dynamo=True``; it needs
``onnxscript``). The one place where PyTorch has no operator with the graph's semantics, TF1's legacy
``ResizeBilinear`` ×2, is a small custom operator: in PyTorch it runs
:func:`~inference.dctnet.upsample2x_tf_legacy`, in ONNX it becomes ``Resize`` with
``mode=linear, coordinate_transformation_mode=asymmetric`` (source coordinate ``dst / 2``). The
graph is traced once; the second generator's weights (and eps, kept as a weight) are then applied
to the same graph. Every file is checked before it is put in place: ``onnx.checker`` and, where
ONNX Runtime is installed, a run against our PyTorch generator (:data:`CHECK_MIN_IDENTICAL`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import platform
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.convert import META_DEMO, ROLES, Role, read_metadata
from inference.dctnet import (
    GUIDED_FILTER_RADIUS,
    LEAKY_SLOPE,
    OUTPUT_CLIP,
    SIZE_MULTIPLE,
    DCTNetGenerator,
    GeneratorRunner,
    load_generator,
    upsample2x_tf_legacy,
)
from inference.errors import ToonserveError
from inference.styles import Style, get_style
from inference.weights import GRAPH_NAMES, StyleWeights

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: Export formats the CLI offers.
FORMATS: Final = ("onnx",)
#: ONNX opset of the exported graphs: the lowest the ``torch.export``-based exporter writes natively
#: (older ones go through a version converter), so the files open in as many runtimes as possible.
ONNX_OPSET: Final = 18
#: The official graphs' tensor names (docs/model.md §2.1).
INPUT_NAME: Final = "input_image"
OUTPUT_NAME: Final = "output_image"
#: Names of the dynamic axes of both tensors.
HEIGHT_AXIS: Final = "height"
WIDTH_AXIS: Final = "width"
#: File names of the exported graphs, after the official graph names (``cartoon_h.pb`` …).
ONNX_NAMES: Final[dict[Role, str]] = {role: GRAPH_NAMES[role][0].replace(".pb", ".onnx") for role in ROLES}
MODEL_CARD: Final = "MODEL_CARD.md"
#: Share of uint8 values an export must reproduce exactly in its check (others may be one level off:
#: the truncating cast turns a last-bit difference at an integer boundary into a full level).
CHECK_MIN_IDENTICAL: Final = 0.999
#: Input sizes of the export-time check: the head's crop size, and a non-square background.
CHECK_SIZES: Final[dict[Role, tuple[int, int]]] = {"head": (288, 288), "bg": (240, 320)}
#: What the licence section says for real weights (see docs/model.md §8).
WEIGHTS_LICENCE: Final = "Apache-2.0"


class ExportError(ToonserveError):
    """An export that cannot be made or did not pass its check (the message says why and what to do)."""


# --- The graph ------------------------------------------------------------------------------------


@torch.library.custom_op("toonserve::upsample2x_tf_legacy", mutates_args=())
def _upsample_op(x: Tensor) -> Tensor:
    """TF1 legacy ``ResizeBilinear`` ×2 as one operator, so that it exports as a single ``Resize``."""
    return upsample2x_tf_legacy(x)


@_upsample_op.register_fake
def _(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    return x.new_empty((n, c, 2 * h, 2 * w))


def _upsample_onnx(x: Any) -> Any:
    """The ONNX translation of :func:`_upsample_op`: source coordinate ``dst / 2``, linear, the last
    row and column repeated (the ``Resize`` definition clamps at the border), as tf2onnx writes it."""
    from onnxscript import opset18 as op

    scales: Any = op.Constant(value_floats=[1.0, 1.0, 2.0, 2.0])
    return op.Resize(x, None, scales, mode="linear", coordinate_transformation_mode="asymmetric")


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


def _box(t: Tensor) -> Tensor:
    """The graph's box filter: 3×3 depthwise sum with weights 1/9, zero padding (not yet divided by N)."""
    c, k = t.shape[1], 2 * GUIDED_FILTER_RADIUS + 1
    kernel = torch.full((c, 1, k, k), 1.0 / (k * k), dtype=t.dtype, device=t.device)
    return F.conv2d(t, kernel, padding=GUIDED_FILTER_RADIUS, groups=c)


class OfficialGraph(nn.Module):
    """The official frozen graph around a :class:`~inference.dctnet.DCTNetGenerator`, as one module.

    ``forward``: ``input_image`` (H, W, 3) float32 BGR 0..255 → ``output_image`` (H, W, 3) uint8 BGR
    0..254, H and W positive multiples of 4. The U-Net runs the generator's own convolutions in the
    order of :meth:`DCTNetGenerator.unet`; the pre- and post-processing follow the graph op by op.
    The guided filter's eps is a buffer (a weight of the exported graph, like the convolutions), so
    one traced graph serves both generators of a style.
    """

    eps: Tensor

    def __init__(self, generator: DCTNetGenerator) -> None:
        super().__init__()
        self.generator = generator
        self.register_buffer("eps", torch.tensor(generator.eps, dtype=torch.float32))

    def _unet(self, x: Tensor) -> Tensor:
        g = self.generator
        x0 = _lrelu(g.Conv(x))
        # TF "SAME" with stride 2 on even sizes: nothing before, one row/column after.
        x1 = _lrelu(g.Conv_2(_lrelu(g.Conv_1(F.pad(x0, (0, 1, 0, 1))))))
        x2 = _lrelu(g.Conv_4(_lrelu(g.Conv_3(F.pad(x1, (0, 1, 0, 1))))))
        for i in range(4):
            x2 = getattr(g, f"block_{i}")(x2)
        x2 = _lrelu(g.Conv_5(x2))
        x3 = _lrelu(g.Conv_7(_lrelu(g.Conv_6(_upsample_op(x2) + x1))))
        y: Tensor = g.Conv_9(_lrelu(g.Conv_8(_upsample_op(x3) + x0)))
        return y

    def forward(self, input_image: Tensor) -> Tensor:
        x = (input_image / 127.5 - 1.0).permute(2, 0, 1).unsqueeze(0)
        y = self._unet(x)
        n = _box(torch.ones_like(x[:, :1]))
        c = x.shape[1]
        means = _box(torch.cat([x, y, x * y, x * x], dim=1)) / n
        mean_x, mean_y, mean_xy, mean_xx = torch.split(means, c, dim=1)
        cov_xy = mean_xy - mean_x * mean_y
        var_x = mean_xx - mean_x * mean_x
        a = cov_xy / (var_x + self.eps)
        b = mean_y - a * mean_x
        mean_a, mean_b = torch.split(_box(torch.cat([a, b], dim=1)) / n, c, dim=1)
        z = (mean_a * x + mean_b)[0].permute(1, 2, 0)
        return ((z.clamp(-OUTPUT_CLIP, OUTPUT_CLIP) + 1.0) * 127.5).to(torch.uint8)


#: Loggers of the exporter and of the ONNX optimiser it runs (onnxscript, onnx_ir).
_EXPORTER_LOGGERS: Final = ("torch.onnx", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's warnings and log lines (deprecations inside torch, optional torchvision ops,
    the optimiser's passes) say nothing about this graph; keep them off the command line and out of
    the service's log."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ExportError(
            f"ONNX export needs the {module} package ({exc}); install it with: "
            f"pip install 'toonserve[{extra}]'"
        ) from exc


def trace_onnx(generator: DCTNetGenerator) -> Any:
    """``torch.onnx.export`` of :class:`OfficialGraph` around ``generator`` in float32: a
    ``torch.onnx.ONNXProgram`` with the official names, dynamic height and width, opset
    :data:`ONNX_OPSET`."""
    return export_program(OfficialGraph(generator.float().cpu().eval()))


def export_program(module: nn.Module) -> Any:
    """``torch.onnx.export`` of a module with :class:`OfficialGraph`'s signature (``input_image``
    (H, W, 3) float32 → ``output_image``), H and W dynamic multiples of 4."""
    _require("onnx", "onnx")
    _require("onnxscript", "onnx")
    from torch.export import Dim

    # Traced at a size that is a multiple of 4 but not of 8, so nothing specialises on larger multiples.
    example = torch.full((36, 44, 3), 128.0)
    h, w = Dim("h", min=1), Dim("w", min=1)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=ONNX_OPSET,
            dynamo=True,
            dynamic_shapes={"input_image": {0: SIZE_MULTIPLE * h, 1: SIZE_MULTIPLE * w}},
            custom_translation_table={torch.ops.toonserve.upsample2x_tf_legacy.default: _upsample_onnx},
            verbose=False,
        )
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise ExportError("torch.onnx.export returned no program")
    return program


def _state_dict(generator: DCTNetGenerator) -> dict[str, Tensor]:
    return {k: v.detach().float().cpu() for k, v in OfficialGraph(generator).state_dict().items()}


def with_weights(program: Any, generator: DCTNetGenerator) -> onnx.ModelProto:
    """The graph of ``program`` (from :func:`trace_onnx`, of any generator: the traced graph does not
    depend on the weights) holding ``generator``'s float32 weights and eps. Changes ``program``."""
    state = _state_dict(generator)
    program.apply_weights(state)
    model: onnx.ModelProto = program.model_proto
    missing = set(state) - {init.name for init in model.graph.initializer}
    if missing:
        raise ExportError(f"the exported graph has no weights named {sorted(missing)}")
    return model


def _finish(model: onnx.ModelProto, metadata: dict[str, str], doc: str) -> None:
    """Name the dynamic axes as the card does, drop intermediate shape notes, attach the metadata."""
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, (HEIGHT_AXIS, WIDTH_AXIS), strict=False):
            dim.Clear()
            dim.dim_param = name
    # The exporter's intermediate shapes use its own symbols ("2*h"); they are optional annotations.
    del model.graph.value_info[:]
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = doc
    model.producer_name = "toonserve"
    model.producer_version = _version("toonserve")


# --- Checks -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """An exported graph run by ONNX Runtime against our PyTorch generator on one image."""

    size: tuple[int, int]
    identical: float
    max_levels: int
    runtime: str

    def describe(self) -> str:
        h, w = self.size
        return (
            f"{self.runtime} on a {h}×{w} test image against toonserve's PyTorch generator: "
            f"{self.identical:.4%} of values identical, max deviation {self.max_levels} level"
            f"{'' if self.max_levels == 1 else 's'}"
        )


def check_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic test input: (h, w, 3) float32 BGR 0..255 with smooth areas, edges and noise."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, max(h // 24, 2), max(w // 24, 2))))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    blocks = np.kron(rng.uniform(0, 255, (max(h // 32, 1) + 1, max(w // 32, 1) + 1, 3)), np.ones((32, 32, 1)))
    image = 0.6 * smooth.numpy() + 0.3 * blocks[:h, :w] + rng.normal(0, 6, (h, w, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.float32)


def run_onnxruntime(path: Path, image: np.ndarray, threads: int = 0) -> np.ndarray:
    """``output_image`` of the ONNX graph at ``path`` for ``image`` ((H, W, 3) float32 BGR 0..255)."""
    ort = _require("onnxruntime", "onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run([OUTPUT_NAME], {INPUT_NAME: image})[0]
    return out


def _torch_output(weights: Path, image: np.ndarray) -> np.ndarray:
    runner = GeneratorRunner(load_generator(weights), backend="eager")
    out = runner(torch.from_numpy(image).permute(2, 0, 1)[None])
    result: np.ndarray = out[0].permute(1, 2, 0).numpy()
    return result


def check_export(path: Path, weights: Path, size: tuple[int, int]) -> Check | None:
    """Run ``path`` with ONNX Runtime against the PyTorch generator of ``weights`` at ``size``.

    None when ONNX Runtime is not installed. Raises :class:`ExportError` when fewer than
    :data:`CHECK_MIN_IDENTICAL` of the values are identical or any is more than one level off.
    """
    try:
        import onnxruntime  # type: ignore[import-untyped]
    except ImportError:
        return None
    image = check_image(*size)
    ours = run_onnxruntime(path, image)
    ref = _torch_output(weights, image)
    if ours.shape != ref.shape or ours.dtype != np.uint8:
        raise ExportError(
            f"{path.name}: output {ours.dtype}{list(ours.shape)}, expected uint8{list(ref.shape)}"
        )
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    check = Check(size, float((diff == 0).mean()), int(diff.max()), f"ONNX Runtime {onnxruntime.__version__}")
    if check.max_levels > 1 or check.identical < CHECK_MIN_IDENTICAL:
        raise ExportError(f"{path.name} failed its check: {check.describe()}; the files were not written")
    return check


# --- A style's export -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedGraph:
    role: Role
    path: Path
    source_file: str
    source_sha256: str
    eps: float
    sha256: str
    check: Check | None


@dataclass(frozen=True)
class StyleExport:
    """What :func:`export_style` wrote."""

    style: str
    directory: Path
    graphs: dict[Role, ExportedGraph]
    card: Path
    demo: bool


def export_style(weights: StyleWeights, out_dir: Path, *, check: bool = True) -> StyleExport:
    """Write ``cartoon_h.onnx``, ``cartoon_bg.onnx`` and ``MODEL_CARD.md`` for ``weights`` into ``out_dir``.

    ``weights``: a resolved style (:func:`inference.weights.resolve`). Each file is checked
    (:func:`check_export`) before anything is put in place; files of an earlier export in
    ``out_dir`` are replaced. Raises :class:`ExportError` when a package is missing or a check fails.
    """
    _require("onnx", "onnx")
    import onnx

    style = get_style(weights.style)
    paths: dict[Role, Path] = {"head": weights.head, "bg": weights.bg}
    metas = {role: read_metadata(path) for role, path in paths.items()}
    demo = weights.demo or any(meta.get(META_DEMO) == "true" for meta in metas.values())
    generators = {role: load_generator(path) for role, path in paths.items()}

    program = trace_onnx(generators["bg"])
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[Role, Path] = {}
    graphs: dict[Role, ExportedGraph] = {}
    try:
        for role in ROLES:
            model = with_weights(program, generators[role])
            meta = metas[role]
            metadata = {
                "style": style.name,
                "role": role,
                "modelscope_model": style.model_id,
                "modelscope_revision": style.revision or "default",
                "source_file": meta.get("source_file", "?"),
                "source_sha256": meta.get("source_sha256", "?"),
                "guided_filter_eps": repr(generators[role].eps),
                "demo_weights": "true" if demo else "false",
                "size_rule": f"height and width: positive multiples of {SIZE_MULTIPLE}",
            }
            _finish(model, metadata, _doc(style, role, demo))
            onnx.checker.check_model(model, full_check=True)
            tmp = out_dir / f".{ONNX_NAMES[role]}.{uuid.uuid4().hex}.tmp"
            staged[role] = tmp
            onnx.save_model(model, str(tmp))
            result = check_export(tmp, paths[role], CHECK_SIZES[role]) if check else None
            graphs[role] = ExportedGraph(
                role,
                out_dir / ONNX_NAMES[role],
                metadata["source_file"],
                metadata["source_sha256"],
                generators[role].eps,
                hashlib.sha256(tmp.read_bytes()).hexdigest(),
                result,
            )
        for role, tmp in staged.items():
            tmp.replace(graphs[role].path)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    card = out_dir / MODEL_CARD
    card.write_text(model_card(style, graphs, demo))
    log.info("exported style %s to ONNX in %s", style.name, out_dir)
    return StyleExport(style.name, out_dir, graphs, card, demo)


def _doc(style: Style, role: Role, demo: bool) -> str:
    what = "head (aligned 288×288 face crops)" if role == "head" else "background (whole image)"
    weights = "DEMO WEIGHTS (random, not a model)" if demo else f"{style.model_id}"
    return (
        f"DCT-Net {style.name} {what} generator, {weights}. {INPUT_NAME}: float32 [height, width, 3] BGR "
        f"0..255; {OUTPUT_NAME}: uint8 [height, width, 3] BGR 0..254; height and width positive "
        f"multiples of {SIZE_MULTIPLE}. Exported by toonserve with the official graph's interface."
    )


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def model_card(style: Style, graphs: dict[Role, ExportedGraph], demo: bool) -> str:
    """The Markdown model card written beside the exported files."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    revision = (
        f"`{style.revision}`"
        if style.revision
        else "the hub's default revision when the weights were downloaded (ModelScope records no "
        "commit in the files; the SHA-256 of the source graphs below identify them)"
    )
    rows = "\n".join(
        f"| `{g.path.name}` | {'head' if g.role == 'head' else 'background'} | `{g.source_file}` | "
        f"`{g.source_sha256}` | {g.eps:g} | `{g.sha256}` |"
        for g in (graphs["bg"], graphs["head"])
    )
    checks = "\n".join(
        f"- `{g.path.name}`: "
        + (g.check.describe() if g.check else "not run (ONNX Runtime is not installed)")
        for g in (graphs["bg"], graphs["head"])
    )
    if demo:
        banner = (
            "\n> **Demo weights.** These files hold random weights in the official architecture, written "
            "by `toonserve demo-weights`; they are not a DCT-Net model and do not make cartoons. Use them "
            "to test a pipeline only.\n"
        )
        licence = "None applies: the weights are random numbers drawn by toonserve, not a published model."
    else:
        banner = ""
        licence = (
            f"{WEIGHTS_LICENCE}, the licence under which the DCT-Net models are published on ModelScope "
            "(the DCT-Net source repository, menyifang/DCT-Net, is Apache-2.0 as well). The model "
            "directory itself carries no licence file, so toonserve did not read this from the files: "
            f"check the model page of `{style.model_id}` before you redistribute these files. They are a "
            "derivative of those weights (the same values in another format); Apache-2.0 asks you to "
            "pass on the licence and notices and to say that the files were changed."
        )
    return f"""# DCT-Net `{style.name}` generators, ONNX
{banner}
| | |
|---|---|
| style | `{style.name}`: {style.description} |
| ModelScope model | `{style.model_id}` |
| revision | {revision} |
| weights | {"demo (random)" if demo else "the official ones, converted by toonserve"} |
| opset | ai.onnx {ONNX_OPSET} |
| exported | {today} by toonserve {_version("toonserve")} |

| file | network | source graph | source SHA-256 | guided-filter eps | file SHA-256 |
|---|---|---|---|---|---|
{rows}

The background network stylises a whole image; the head network stylises face crops aligned to
288×288 as upstream aligns them (docs/model.md §4.3 in toonserve explains the crop).

## Interface: the official graph's

- Input `{INPUT_NAME}`: float32 `[{HEIGHT_AXIS}, {WIDTH_AXIS}, 3]`, **BGR**, values 0..255, no batch
  axis (feed one image per call, as the `.pb` takes it).
- Output `{OUTPUT_NAME}`: uint8 `[{HEIGHT_AXIS}, {WIDTH_AXIS}, 3]`, **BGR**, values 0..254.
- Sizes: height and width are dynamic and must be positive multiples of {SIZE_MULTIPLE}, as in the
  TensorFlow graph, whose skip additions fail otherwise; ONNX Runtime refuses other sizes with a
  shape error. Pad first (upstream pads with white to a multiple of 16) and crop the result.
- Inside, as in the `.pb`: `x = input / 127.5 - 1`; the U-Net (18 convolutions, TF "SAME" padding,
  TF1 legacy bilinear ×2 upsampling as `Resize` linear/asymmetric); the guided filter (r = 1, the
  eps above, zero-padded box means divided by `box(ones)`); clip to ±0.999999; `(z + 1) * 127.5`;
  a truncating cast to uint8.

Code written for the official `cartoon_bg.pb` / `cartoon_h.pb` (feed `input_image`, fetch
`output_image`) runs these files unchanged:

```python
import numpy as np, onnxruntime as ort
from PIL import Image

session = ort.InferenceSession("cartoon_bg.onnx", providers=["CPUExecutionProvider"])
bgr = np.asarray(Image.open("photo.jpg").convert("RGB"), dtype=np.float32)[:, :, ::-1]
h, w = bgr.shape[:2]
padded = np.pad(bgr, ((0, -h % 16), (0, -w % 16), (0, 0)), constant_values=255)
out = session.run(["output_image"], {{"input_image": np.ascontiguousarray(padded)}})[0][:h, :w]
Image.fromarray(out[:, :, ::-1]).save("cartoon.png")
```

## How they were exported

From toonserve's PyTorch port of the generator (exact to the TensorFlow graph; float32, its plain
modules) with `torch.onnx.export`, the `torch.export`-based exporter (`dynamo=True`; torch
{torch.__version__}, onnxscript {_version("onnxscript")}, onnx {_version("onnx")}), on
{platform.system()} {platform.machine()}. The graph's own pre- and post-processing is part of the
exported module, so each file is the whole `.pb`, not only its network.

## How they were checked

- `onnx.checker.check_model(full_check=True)` passed for both files.
{checks}
- toonserve's tests hold the same export to TensorFlow runs of graphs built like the official ones
  (random weights): at least 99.9 % of values identical and none more than one level off, at
  several sizes. One-level differences are expected: the cast truncates, so a difference in the
  last bit of a float just below an integer becomes a whole level.

## Licence of the weights

{licence}
"""
