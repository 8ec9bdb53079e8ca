"""A minimal TensorFlow ``GraphDef`` schema for the protobuf runtime, so no TensorFlow is imported.

Only the fields the converter reads are declared, with TensorFlow's field numbers
(``graph.proto``, ``node_def.proto``, ``attr_value.proto``, ``tensor.proto``,
``tensor_shape.proto``). Fields we do not declare are kept by protobuf as unknown fields, so any
GraphDef parses. The message classes are built once from a ``FileDescriptorProto`` at first use.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Final

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE: Final = "toonserve.tfproto"

_F = descriptor_pb2.FieldDescriptorProto

#: TensorFlow ``DataType`` enum values we can turn into numpy arrays.
DTYPES: Final[dict[int, np.dtype[Any]]] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float64),
    3: np.dtype(np.int32),
    4: np.dtype(np.uint8),
    9: np.dtype(np.int64),
    10: np.dtype(np.bool_),
    19: np.dtype(np.float16),
}
# The repeated *_val field that holds values of each dtype when tensor_content is empty.
_VAL_FIELD: Final = {
    1: "float_val",
    2: "double_val",
    3: "int_val",
    4: "int_val",
    9: "int64_val",
    10: "bool_val",
}


def _field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    label: int = _F.LABEL_OPTIONAL,
    type_name: str = "",
    packed: bool = False,
    oneof: int | None = None,
) -> None:
    f = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = f".{_PACKAGE}.{type_name}"
    if packed:
        f.options.packed = True
    if oneof is not None:
        f.oneof_index = oneof


@cache
def _classes() -> dict[str, Any]:
    fd = descriptor_pb2.FileDescriptorProto(name="toonserve_tfproto.proto", package=_PACKAGE, syntax="proto3")
    rep = _F.LABEL_REPEATED

    dim = fd.message_type.add(name="Dim")
    _field(dim, "size", 1, _F.TYPE_INT64)
    _field(dim, "name", 2, _F.TYPE_STRING)

    shape = fd.message_type.add(name="TensorShapeProto")
    _field(shape, "dim", 2, _F.TYPE_MESSAGE, rep, "Dim")
    _field(shape, "unknown_rank", 3, _F.TYPE_BOOL)

    tensor = fd.message_type.add(name="TensorProto")
    _field(tensor, "dtype", 1, _F.TYPE_INT32)
    _field(tensor, "tensor_shape", 2, _F.TYPE_MESSAGE, type_name="TensorShapeProto")
    _field(tensor, "version_number", 3, _F.TYPE_INT32)
    _field(tensor, "tensor_content", 4, _F.TYPE_BYTES)
    _field(tensor, "float_val", 5, _F.TYPE_FLOAT, rep, packed=True)
    _field(tensor, "double_val", 6, _F.TYPE_DOUBLE, rep, packed=True)
    _field(tensor, "int_val", 7, _F.TYPE_INT32, rep, packed=True)
    _field(tensor, "int64_val", 10, _F.TYPE_INT64, rep, packed=True)
    _field(tensor, "bool_val", 11, _F.TYPE_BOOL, rep, packed=True)

    lst = fd.message_type.add(name="ListValue")
    _field(lst, "s", 2, _F.TYPE_BYTES, rep)
    _field(lst, "i", 3, _F.TYPE_INT64, rep, packed=True)
    _field(lst, "f", 4, _F.TYPE_FLOAT, rep, packed=True)
    _field(lst, "b", 5, _F.TYPE_BOOL, rep, packed=True)

    attr = fd.message_type.add(name="AttrValue")
    attr.oneof_decl.add(name="value")
    _field(attr, "list", 1, _F.TYPE_MESSAGE, type_name="ListValue", oneof=0)
    _field(attr, "s", 2, _F.TYPE_BYTES, oneof=0)
    _field(attr, "i", 3, _F.TYPE_INT64, oneof=0)
    _field(attr, "f", 4, _F.TYPE_FLOAT, oneof=0)
    _field(attr, "b", 5, _F.TYPE_BOOL, oneof=0)
    _field(attr, "type", 6, _F.TYPE_INT32, oneof=0)
    _field(attr, "shape", 7, _F.TYPE_MESSAGE, type_name="TensorShapeProto", oneof=0)
    _field(attr, "tensor", 8, _F.TYPE_MESSAGE, type_name="TensorProto", oneof=0)

    node = fd.message_type.add(name="NodeDef")
    entry = node.nested_type.add(name="AttrEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_MESSAGE, type_name="AttrValue")
    _field(node, "name", 1, _F.TYPE_STRING)
    _field(node, "op", 2, _F.TYPE_STRING)
    _field(node, "input", 3, _F.TYPE_STRING, rep)
    _field(node, "device", 4, _F.TYPE_STRING)
    _field(node, "attr", 5, _F.TYPE_MESSAGE, rep, "NodeDef.AttrEntry")

    graph = fd.message_type.add(name="GraphDef")
    _field(graph, "node", 1, _F.TYPE_MESSAGE, rep, "NodeDef")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in ("GraphDef", "TensorProto")
    }


def parse_graph_def(data: bytes) -> Any:
    """Parse serialized GraphDef bytes; raises ``google.protobuf.message.DecodeError`` on bad input."""
    graph = _classes()["GraphDef"]()
    graph.ParseFromString(data)
    return graph


def tensor_to_array(tensor: Any) -> np.ndarray:
    """A ``TensorProto`` → numpy array. Raises ``ValueError`` for unsupported dtypes or sizes."""
    dtype = DTYPES.get(int(tensor.dtype))
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype enum {tensor.dtype}")
    shape = tuple(int(d.size) for d in tensor.tensor_shape.dim)
    count = int(np.prod(shape, dtype=np.int64))
    if tensor.tensor_content:
        content: bytes = tensor.tensor_content
        if len(content) != count * dtype.itemsize:
            raise ValueError(
                f"tensor_content has {len(content)} bytes, shape {shape} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(content, dtype=dtype).reshape(shape).copy()
    field = _VAL_FIELD.get(int(tensor.dtype))
    values = np.asarray(list(getattr(tensor, field)) if field else [], dtype=dtype)
    if values.size == count:
        return values.reshape(shape)
    if values.size == 1:  # TF stores a splatted constant as one value
        return np.full(shape, values[0], dtype=dtype)
    if values.size == 0 and count == 0:
        return values.reshape(shape)
    raise ValueError(f"tensor has {values.size} values, shape {shape} needs {count}")
