"""Convert an official DCT-Net frozen graph (``cartoon_h.pb`` / ``cartoon_bg.pb``) to safetensors.

The GraphDef is read with protobuf alone (:mod:`inference._graphdef`); TensorFlow is never imported.
From the graph we take the 36 ``generator/<scope>/{weights,biases}`` constants (docs/model.md §3),
transpose weights from HWIO to PyTorch's OIHW, and find the guided filter's eps by topology: the
scalar constant added to ``var_x`` in the denominator of ``A = cov_xy / (var_x + eps)``. Every shape
and the parameter total are checked; anything unexpected is refused with a :class:`ConversionError`
that names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from google.protobuf.message import DecodeError

from inference._graphdef import parse_graph_def, tensor_to_array
from inference.dctnet import CONV_SPECS, META_EPS, PARAMETER_COUNT, TF_SCOPE, tf_to_torch_name
from inference.errors import ConversionError

Role = Literal["head", "bg"]
ROLES: Final[tuple[Role, ...]] = ("head", "bg")
#: Bumped whenever the converted layout changes, so stale caches are converted again.
FORMAT_VERSION: Final = "1"
#: Metadata key of a converted file whose weights are demo weights (value "true").
META_DEMO: Final = "demo"

_WEIGHT_RE: Final = re.compile(rf"(?:^|/){TF_SCOPE}/(.+)/(weights|biases)$")
_ADD_OPS: Final = frozenset({"Add", "AddV2"})


@dataclass(frozen=True)
class GeneratorWeights:
    """What a frozen generator graph holds: PyTorch-named float32 tensors (OIHW) and the eps."""

    tensors: dict[str, np.ndarray]
    eps: float
    sha256: str


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in CONV_SPECS:
        shapes[f"{TF_SCOPE}/{spec.scope}/weights"] = spec.weight_shape_tf
        shapes[f"{TF_SCOPE}/{spec.scope}/biases"] = (spec.out_channels,)
    return shapes


def _node_name(ref: str) -> str:
    """``^name`` / ``name:1`` → ``name``."""
    return ref.lstrip("^").split(":")[0]


def _resolve(nodes: dict[str, Any], ref: str) -> Any:
    """The node behind an input reference, looking through Identity nodes."""
    node = nodes.get(_node_name(ref))
    while node is not None and node.op == "Identity" and node.input:
        node = nodes.get(_node_name(node.input[0]))
    return node


def _scalar_const(node: Any) -> float | None:
    if node is None or node.op != "Const" or "value" not in node.attr:
        return None
    try:
        value = tensor_to_array(node.attr["value"].tensor)
    except ValueError:
        return None
    if value.size != 1 or value.dtype.kind != "f":
        return None
    return float(value.reshape(()))


def _find_eps(nodes: dict[str, Any], where: str) -> float:
    """The guided filter's eps: a scalar float Const added to a non-constant in a RealDiv divisor."""
    found: list[tuple[str, float]] = []
    for node in nodes.values():
        if node.op not in ("RealDiv", "Div") or len(node.input) < 2:
            continue
        divisor = _resolve(nodes, node.input[1])
        if divisor is None or divisor.op not in _ADD_OPS or len(divisor.input) != 2:
            continue
        operands = [_resolve(nodes, ref) for ref in divisor.input]
        consts = [_scalar_const(op) for op in operands]
        scalars = [c for c in consts if c is not None]
        if len(scalars) == 1:
            found.append((divisor.name, scalars[0]))
    if len(found) != 1:
        detail = ", ".join(f"{name}={value}" for name, value in found) or "none"
        raise ConversionError(
            f"{where}: expected exactly one guided-filter eps (a scalar added to var_x in the divisor of "
            f"A = cov_xy / (var_x + eps)); found {detail}. Is this a DCT-Net generator graph?"
        )
    eps = found[0][1]
    if not (0.0 < eps < 1.0):
        raise ConversionError(f"{where}: guided-filter eps {eps} is outside (0, 1)")
    return eps


def _check_endpoints(nodes: dict[str, Any], where: str) -> None:
    missing = [n for n in ("input_image", "output_image") if not any(k.split("/")[-1] == n for k in nodes)]
    if missing:
        raise ConversionError(
            f"{where}: no {' or '.join(missing)} node; not an exported DCT-Net generator graph"
        )


def read_generator_pb(path: Path) -> GeneratorWeights:
    """Read and validate a frozen generator graph. Raises :class:`ConversionError` on anything odd."""
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConversionError(f"{where}: cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ConversionError(f"{where}: file is empty")
    try:
        graph = parse_graph_def(data)
    except DecodeError as exc:
        raise ConversionError(
            f"{where}: not a valid TensorFlow GraphDef ({exc}); the file may be truncated or corrupt, "
            "download it again"
        ) from exc
    nodes = {node.name: node for node in graph.node}
    if not nodes:
        raise ConversionError(f"{where}: the graph has no nodes; the file is truncated or not a frozen graph")
    _check_endpoints(nodes, where)

    expected = _expected_shapes()
    found: dict[str, np.ndarray] = {}
    for node in nodes.values():
        match = _WEIGHT_RE.search(node.name)
        if node.op != "Const" or match is None:
            continue
        key = f"{TF_SCOPE}/{match.group(1)}/{match.group(2)}"
        if key not in expected:
            raise ConversionError(f"{where}: unexpected generator tensor '{node.name}'")
        if key in found:
            raise ConversionError(f"{where}: generator tensor '{key}' appears twice")
        try:
            found[key] = tensor_to_array(node.attr["value"].tensor)
        except ValueError as exc:
            raise ConversionError(f"{where}: tensor '{node.name}' cannot be read: {exc}") from exc

    missing = sorted(set(expected) - set(found))
    if missing:
        raise ConversionError(
            f"{where}: missing {len(missing)} of {len(expected)} generator tensors: {', '.join(missing)}"
        )
    tensors: dict[str, np.ndarray] = {}
    for key, shape in expected.items():
        value = found[key]
        if value.dtype != np.float32:
            raise ConversionError(f"{where}: tensor '{key}' has dtype {value.dtype}, expected float32")
        if value.shape != shape:
            raise ConversionError(
                f"{where}: tensor '{key}' has shape {list(value.shape)}, expected {list(shape)}"
            )
        if not np.isfinite(value).all():
            raise ConversionError(f"{where}: tensor '{key}' contains NaN or infinite values")
        # HWIO → OIHW. No kernel flip: both frameworks compute cross-correlation.
        torch_value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value
        tensors[tf_to_torch_name(key)] = np.ascontiguousarray(torch_value)
    total = sum(int(v.size) for v in tensors.values())
    if total != PARAMETER_COUNT:  # cannot differ when every shape matched; kept as the stated invariant
        raise ConversionError(f"{where}: {total} parameters, expected {PARAMETER_COUNT}")
    eps = _find_eps(nodes, where)
    return GeneratorWeights(tensors=tensors, eps=eps, sha256=hashlib.sha256(data).hexdigest())


def convert_pb(pb_path: Path, out_path: Path, style: str, role: Role, demo: bool = False) -> dict[str, str]:
    """Convert ``pb_path`` to ``out_path`` (safetensors, written atomically); returns its metadata.
    ``demo``: the graph holds demo weights (``inference.demo``), recorded as ``META_DEMO``."""
    from safetensors.numpy import save_file

    if role not in ROLES:
        raise ConversionError(f"{pb_path}: role must be one of {', '.join(ROLES)}, got {role!r}")
    weights = read_generator_pb(pb_path)
    metadata = {
        META_EPS: json.dumps(weights.eps),
        "source_file": pb_path.name,
        "source_sha256": weights.sha256,
        "style": style,
        "role": role,
        "format_version": FORMAT_VERSION,
        "parameters": str(PARAMETER_COUNT),
    }
    if demo:
        metadata[META_DEMO] = "true"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer, not per process id: replicas in containers all run as pid 1 and may convert
    # into one shared cache at once; the last complete file wins, never a mix.
    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(weights.tensors, str(tmp), metadata=metadata)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return metadata


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a converted file (empty dict when the file is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta: dict[str, str] = dict(f.metadata() or {})
            return meta
    except (OSError, ValueError, RuntimeError):
        return {}


def describe(paths: Iterable[Path]) -> list[str]:
    """One line per converted file: name, style, role, eps and source hash prefix (for the CLI)."""
    lines = []
    for path in paths:
        meta = read_metadata(path)
        lines.append(
            f"{path.name}: style={meta.get('style', '?')} role={meta.get('role', '?')} "
            f"eps={meta.get(META_EPS, '?')} source={meta.get('source_file', '?')} "
            f"sha256={meta.get('source_sha256', '?')[:12]}"
        )
    return lines
