"""Reading the MTCNN weights: joblib/LZ4 files inside the ``mtcnn`` distribution, numpy data only.

* :func:`package_weights_dir` finds the three files through the distribution's metadata (never
  ``import mtcnn``);
* :func:`read_numpy_pickle` reads them as data: they are joblib dumps (an LZ4 frame around a
  protocol-4 pickle of a list of ``joblib.numpy_pickle.NumpyArrayWrapper`` headers, each followed by
  the raw array bytes), and :class:`_NumpyOnlyUnpickler` admits numpy's array/dtype classes and that
  header only, refusing any other global before it is resolved, so nothing in the file can run code.
"""

from __future__ import annotations

import importlib.metadata
import io
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Final

import numpy as np

from inference.faces.detector import FaceDetectorError

#: Distribution whose files hold the weights, and where they sit inside it.
MTCNN_DISTRIBUTION: Final = "mtcnn"
MTCNN_WEIGHTS_PACKAGE_DIR: Final = "mtcnn/assets/weights"
#: Weight file of each network.
MTCNN_WEIGHT_FILES: Final = {"pnet": "pnet.lz4", "rnet": "rnet.lz4", "onet": "onet.lz4"}
_LZ4_MAGIC: Final = b"\x04\x22\x4d\x18"


class _ArrayHeader:
    """Stands in for ``joblib.numpy_pickle.NumpyArrayWrapper``: the header written before each array's
    raw bytes (``shape``, ``order``, ``dtype``, and since joblib 1.2 ``numpy_array_alignment_bytes``)."""

    _FIELDS: Final = frozenset(
        {"subclass", "shape", "order", "dtype", "allow_mmap", "numpy_array_alignment_bytes"}
    )

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not set(state) <= self._FIELDS:
            raise pickle.UnpicklingError(f"unexpected array header {state!r}")
        self.state = state


def _reconstruct_functions() -> dict[tuple[str, str], Any]:
    # What ndarray.__reduce_ex__ names: _reconstruct (protocols < 5) and _frombuffer (5). Both only
    # build an array from a shape, a dtype and bytes. numpy 2 moved them from numpy.core to
    # numpy._core; files name either, so both names map to whichever module this numpy has.
    for package in ("numpy._core", "numpy.core"):
        try:
            helpers = {
                "multiarray": getattr(importlib.import_module(f"{package}.multiarray"), "_reconstruct"),  # noqa: B009
                "numeric": getattr(importlib.import_module(f"{package}.numeric"), "_frombuffer"),  # noqa: B009
            }
        except (ImportError, AttributeError):
            continue
        names = {"multiarray": "_reconstruct", "numeric": "_frombuffer"}
        return {
            (f"{prefix}.{module}", names[module]): function
            for prefix in ("numpy._core", "numpy.core")
            for module, function in helpers.items()
        }
    return {}


#: The only globals a weight pickle may name. Everything else is refused before it is resolved.
_ALLOWED_GLOBALS: Final[dict[tuple[str, str], Any]] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("joblib.numpy_pickle", "NumpyArrayWrapper"): _ArrayHeader,
    **_reconstruct_functions(),
}
#: Array element kinds admitted: bool, signed/unsigned integers, floats.
_ALLOWED_KINDS: Final = frozenset("biuf")


class _NumpyOnlyUnpickler(pickle._Unpickler):
    """A pickle reader that builds numpy arrays and plain containers, and nothing else.

    ``find_class`` is the one door to code in a pickle (``GLOBAL``/``STACK_GLOBAL``/``INST``/``OBJ`` and
    the extension registry all go through it); it opens for :data:`_ALLOWED_GLOBALS` only. The joblib
    format also needs ``BUILD`` hooked: after a header is built, the raw array bytes follow in the
    stream, outside the pickle opcodes. The pure-Python unpickler is used because the C one cannot
    be hooked there (joblib does the same).
    """

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self._stream = stream

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global '{module}.{name}': only numpy arrays are admitted"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id: only numpy arrays are admitted")

    def _load_build(self) -> None:
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        top = self.stack[-1]  # type: ignore[attr-defined]
        if isinstance(top, _ArrayHeader):
            self.stack[-1] = self._read_array(top)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = _load_build

    def _read_array(self, header: _ArrayHeader) -> np.ndarray:
        state = header.state
        dtype = state.get("dtype")
        shape = state.get("shape")
        order = state.get("order", "C")
        if state.get("subclass", np.ndarray) is not np.ndarray:
            raise pickle.UnpicklingError("refused array subclass")
        if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in _ALLOWED_KINDS:
            raise pickle.UnpicklingError(f"refused array dtype {dtype!r}: only numeric arrays are admitted")
        if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise pickle.UnpicklingError(f"bad array shape {shape!r}")
        if order not in ("C", "F"):
            raise pickle.UnpicklingError(f"bad array order {order!r}")
        if state.get("numpy_array_alignment_bytes") is not None:
            # One byte gives the padding length, then that many filler bytes.
            pad = self._stream.read(1)
            if len(pad) != 1:
                raise pickle.UnpicklingError("file ends inside an array header")
            self._stream.read(pad[0])
        count = math.prod(shape)
        data = self._stream.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise pickle.UnpicklingError("file ends inside array data")
        flat = np.frombuffer(data, dtype=dtype, count=count)
        array = flat.reshape(shape[::-1]).T if order == "F" else flat.reshape(shape)
        return np.array(array, dtype=dtype.newbyteorder("="))


def read_numpy_pickle(path: Path) -> list[np.ndarray]:
    """The list of numeric arrays stored in a joblib dump (LZ4-compressed or not) at ``path``.

    Only numpy arrays, dtypes and the joblib array header may appear in the pickle; anything else
    (another global, an object array, a persistent id) raises :class:`FaceDetectorError` before it
    is resolved. Arrays come back in native byte order, writable.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FaceDetectorError(f"cannot read face detector weights {path}: {exc}") from exc
    try:
        if raw.startswith(_LZ4_MAGIC):
            import lz4.frame

            raw = lz4.frame.decompress(raw)
        loaded = _NumpyOnlyUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:  # whatever a malformed file makes the parser raise: all mean "bad file"
        raise FaceDetectorError(f"{path} is not a numpy-only weight file: {exc}") from exc
    arrays = loaded if isinstance(loaded, list | tuple) else [loaded]
    if not all(isinstance(a, np.ndarray) and a.dtype.kind in _ALLOWED_KINDS for a in arrays):
        raise FaceDetectorError(f"{path} does not hold a list of numeric arrays")
    return list(arrays)


def package_weights_dir() -> Path:
    """The folder of the MTCNN weight files inside the installed ``mtcnn`` distribution.

    Found through the distribution's file list (its RECORD), so the package is never imported.
    """
    try:
        dist = importlib.metadata.distribution(MTCNN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FaceDetectorError(
            f"the '{MTCNN_DISTRIBUTION}' package, which ships the face detector weights, is not installed; "
            f"install it with: pip install {MTCNN_DISTRIBUTION}"
        ) from None
    wanted = f"{MTCNN_WEIGHTS_PACKAGE_DIR}/{MTCNN_WEIGHT_FILES['pnet']}"
    for file in dist.files or ():
        if file.as_posix() == wanted:
            return Path(str(dist.locate_file(file))).parent
    raise FaceDetectorError(
        f"the installed '{MTCNN_DISTRIBUTION}' {dist.version} does not list {wanted}; reinstall it "
        f"(pip install --force-reinstall {MTCNN_DISTRIBUTION}) or pass a weights directory"
    )
