"""The TensorRT engine build of the ``tensorrt`` section, in a child process of its own.

``python -m bench.gpu.trt_build SPEC.json``: parse the ONNX file the spec names, build a float16 engine
with one optimization profile, write the serialized engine and a JSON of what the build reported
(``{"error": …}`` and exit status 1 when it failed). A build cannot be interrupted in process, so the
section runs it here and kills it at its time limit; the module imports TensorRT and the standard
library only, so it starts at once. The spec (JSON): ``onnx``, ``engine`` and ``info`` paths,
``input`` (the input tensor's name), ``profile`` (``[[h, w], [h, w], [h, w]]``: min, opt, max),
``pin`` (the layers outside the U-Net pinned to float32, TF32 off), ``unet_convs``, ``filter_convs``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any


class TrtError(RuntimeError):
    """TensorRT refused the graph, the build, or a run; the message has what it logged."""


def make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps its warnings and errors (for the JSON) instead of printing them."""

    class Kept(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(f"{getattr(severity, 'name', severity)}: {msg}")

    return Kept()


def _flag(trt: ModuleType, *names: str) -> Any:
    for name in names:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is not None:
            return flag
    raise TrtError(f"this TensorRT has none of BuilderFlag.{', '.join(names)}")


def pin_outside_unet(trt: ModuleType, network: Any, unet_convs: int, filter_convs: int) -> int:
    """Pin every float layer outside the U-Net (before its first convolution, after its last) to
    float32; the number pinned. The network's layers come in the ONNX graph's order, where the U-Net's
    ``unet_convs`` convolutions come first and the guided filter's ``filter_convs`` after them (the
    section checks that on the graph: ``onnx_layout``)."""
    convs = [i for i in range(network.num_layers) if network.get_layer(i).type == trt.LayerType.CONVOLUTION]
    if len(convs) != unet_convs + filter_convs:
        raise TrtError(
            f"the network has {len(convs)} convolution layers, not {unet_convs} + {filter_convs}: "
            "cannot tell the U-Net from the filter"
        )
    first, last = convs[0], convs[unet_convs - 1]
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if first <= i <= last or layer.type == trt.LayerType.CONSTANT or layer.num_outputs == 0:
            continue
        outputs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if any(o.dtype != trt.DataType.FLOAT for o in outputs):  # shapes, indices, the uint8 cast
            continue
        layer.precision = trt.DataType.FLOAT
        for k in range(layer.num_outputs):
            layer.set_output_type(k, trt.DataType.FLOAT)
        pinned += 1
    return pinned


def build(trt: ModuleType, spec: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The serialized engine for ``spec`` (module docstring) and what the build reported."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if int(str(trt.__version__).split(".")[0]) < 10:  # explicit batch is the only kind from 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(spec["onnx"]).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrtError(f"the ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.set_flag(_flag(trt, "FP16"))
    info: dict[str, Any] = dict(tensorrt=str(trt.__version__), layers=network.num_layers)
    if spec["pin"]:
        config.clear_flag(_flag(trt, "TF32"))
        config.set_flag(_flag(trt, "PREFER_PRECISION_CONSTRAINTS", "OBEY_PRECISION_CONSTRAINTS"))
        info["pinned_fp32_layers"] = pin_outside_unet(trt, network, spec["unet_convs"], spec["filter_convs"])
    low, opt, high = (tuple(s) for s in spec["profile"])
    profile = builder.create_optimization_profile()
    profile.set_shape(spec["input"], (*low, 3), (*opt, 3), (*high, 3))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    info["build_s"] = round(time.perf_counter() - start, 1)
    if serialized is None:
        raise TrtError(f"the build failed: {' | '.join(logger.messages[-6:])}")
    engine = bytes(serialized)
    info["engine_mib"] = round(len(engine) / 2**20, 2)
    if logger.messages:
        info["log_tail"] = [m[:300] for m in logger.messages[-4:]]
    return engine, info


def main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    info_path = Path(spec["info"])
    try:
        import tensorrt as trt  # type: ignore[import-not-found]

        engine, info = build(trt, spec)
        Path(spec["engine"]).write_bytes(engine)
    except Exception as exc:
        info_path.write_text(
            json.dumps(
                dict(error=f"{type(exc).__name__}: {exc}"[:1000], traceback=traceback.format_exc()[-2000:])
            )
        )
        return 1
    info_path.write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
