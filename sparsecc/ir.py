"""The model being compiled: an ONNX ModelProto plus what every stage needs to know about it.

`load_model` is the front door of the pipeline: it reads a file safely (size, protobuf, external data that
must stay inside the model's folder), refuses ops, domains and opsets we cannot compile, runs the full
`onnx.checker` and strict shape inference, and wraps the result in `Model`. Passes edit the graph through
onnx-graphsurgeon (`Model.graph()` / `Model.from_graph()`); this module never re-implements graph editing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper, shape_inference, version_converter

from .errors import BadInput, Unsupported, one_line

# Below this opset the frontend's op coverage is thin; such models are upgraded first.
UPGRADE_BELOW_OPSET = 13
MIN_OPSET = 7
MAX_DIM = 1 << 31  # any single dimension beyond this is refused before anything is allocated
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and numpy dtype name of a graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])


@dataclass
class Model:
    """An ONNX model with the name of where it came from (used in every error message)."""

    proto: onnx.ModelProto
    source: str = "<model>"

    def graph(self) -> gs.Graph:
        return gs.import_onnx(self.proto)

    def with_graph(self, graph: gs.Graph) -> Model:
        """A new Model from an edited graph, keeping opsets and IR version."""
        graph.cleanup().toposort()
        proto = gs.export_onnx(graph)
        proto.ir_version = self.proto.ir_version
        del proto.opset_import[:]
        proto.opset_import.extend(self.proto.opset_import)
        return Model(infer_shapes(proto, self.source), self.source)

    @property
    def opset(self) -> int:
        return default_opset(self.proto)

    @property
    def inputs(self) -> list[TensorSpec]:
        inits = {t.name for t in self.proto.graph.initializer}
        return [_spec(v) for v in self.proto.graph.input if v.name not in inits]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [_spec(v) for v in self.proto.graph.output]

    def initializers(self) -> dict[str, np.ndarray]:
        return {t.name: onnx.numpy_helper.to_array(t) for t in self.proto.graph.initializer}

    def save(self, path: str | Path) -> None:
        onnx.save_model(self.proto, str(path))

    def serialize(self) -> bytes:
        return self.proto.SerializeToString(deterministic=True)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    elem = value_info.type.tensor_type.elem_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name if elem else "float32"
    dims = _dims(value_info)
    shape = tuple(d if isinstance(d, int) else -1 for d in dims)
    return TensorSpec(value_info.name, shape, dtype)


def default_opset(proto: onnx.ModelProto) -> int:
    for op in proto.opset_import:
        if op.domain in DEFAULT_DOMAINS:
            return int(op.version)
    return 1


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, expected an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    if not data:
        raise BadInput(f"{path}: empty file")
    return data


def _parse(data: bytes, source: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise BadInput(f"{source}: not an ONNX model ({one_line(e) or 'protobuf parse failed'})") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.graph.node:
        raise BadInput(f"{source}: not an ONNX model (no graph or IR version)")
    return proto


def _check_external_data(proto: onnx.ModelProto, base_dir: Path, source: str) -> None:
    """Refuse external data that would leave the model's folder, then load it."""
    base = base_dir.resolve()
    external = [t for t in external_data_helper._get_all_tensors(proto) if external_data_helper.uses_external_data(t)]
    for tensor in external:
        info = external_data_helper.ExternalDataInfo(tensor)
        loc = info.location
        where = f"{source}: initializer '{tensor.name}' external data '{loc}'"
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise BadInput(f"{where}: path must be relative and inside the model's folder")
        full = (base / loc).resolve()
        if base not in full.parents:
            raise BadInput(f"{where}: resolves outside the model's folder")
        if not full.is_file():
            raise BadInput(f"{where}: file not found")
        need = (info.offset or 0) + (info.length or 0)
        if info.length and full.stat().st_size < need:
            raise BadInput(f"{where}: file is shorter than offset+length ({need} bytes)")
    if external:
        try:
            external_data_helper.load_external_data_for_model(proto, str(base))
        except (OSError, ValueError) as e:
            raise BadInput(f"{source}: cannot load external data ({one_line(e)})") from None


def _check_ops(proto: onnx.ModelProto, source: str) -> None:
    opset = default_opset(proto)
    max_opset = onnx.defs.onnx_opset_version()
    if opset > max_opset:
        raise Unsupported(f"{source}: opset {opset} is newer than the newest supported ({max_opset})")
    if opset < MIN_OPSET:
        raise Unsupported(f"{source}: opset {opset} is older than the oldest supported ({MIN_OPSET})")
    for node in proto.graph.node:
        label = f"{source}: node '{node.name or node.output[0] if node.output else node.name}' (op {node.op_type})"
        if node.domain not in DEFAULT_DOMAINS:
            raise Unsupported(f"{label}: operator domain '{node.domain}' is not supported")
        if not onnx.defs.has(node.op_type):
            raise Unsupported(f"{label}: unknown operator '{node.op_type}'")


def _check_dims(proto: onnx.ModelProto, source: str) -> None:
    if not proto.graph.output:
        raise BadInput(f"{source}: the graph has no outputs")
    for t in proto.graph.initializer:
        if any(d < 0 or d > MAX_DIM for d in t.dims):
            raise BadInput(f"{source}: initializer '{t.name}' has an invalid dimension {list(t.dims)}")
    for v in list(proto.graph.input) + list(proto.graph.output):
        for d in _dims(v):
            if isinstance(d, int) and d > MAX_DIM:
                raise BadInput(f"{source}: '{v.name}' has an absurd dimension {d} (limit {MAX_DIM})")
            if d == 0:
                raise BadInput(f"{source}: '{v.name}' has a zero-size dimension")


def infer_shapes(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as e:
        raise BadInput(f"{source}: shape inference failed: {one_line(e)}") from None


def validate(proto: onnx.ModelProto, source: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BadInput(f"{source}: invalid ONNX model: {one_line(e)}") from None


def _upgrade_opset(proto: onnx.ModelProto) -> onnx.ModelProto:
    if default_opset(proto) >= UPGRADE_BELOW_OPSET:
        return proto
    try:
        upgraded = version_converter.convert_version(proto, UPGRADE_BELOW_OPSET)
        onnx.checker.check_model(upgraded, full_check=True)
        return upgraded
    except Exception:  # the converter lacks adapters for some ops; the original may still import
        return proto


def load_model(source: str | Path | onnx.ModelProto) -> Model:
    """Read, check and shape-infer an ONNX model from a path or a ModelProto."""
    if isinstance(source, onnx.ModelProto):
        name, proto, base = "<model>", onnx.ModelProto(), Path.cwd()
        proto.CopyFrom(source)
    else:
        path = Path(source)
        name, base = str(path), path.parent
        proto = _parse(_read_bytes(path), name)
    _check_external_data(proto, base, name)
    _check_ops(proto, name)
    _check_dims(proto, name)
    # Inference first: exporters often leave output shapes empty, which the full checker refuses.
    proto = infer_shapes(proto, name)
    validate(proto, name)
    proto = _upgrade_opset(proto)
    return Model(infer_shapes(proto, name), name)


def parse_shape_option(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse one `--shape NAME=d0,d1,...` value."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if sep and name else None
    except ValueError:
        shape = None
    if shape is None or any(d <= 0 or d > MAX_DIM for d in shape):
        raise BadInput(f"--shape '{text}': expected NAME=d0,d1,... with positive integer dims")
    return name, shape


def fix_input_shapes(model: Model, shapes: dict[str, tuple[int, ...]] | None = None, batch: int = 1) -> Model:
    """Make every input shape static: given shapes first, then a dynamic leading batch dim -> `batch`.

    Any other unresolved dimension is an error naming the input and the dimension.
    """
    shapes = dict(shapes or {})
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    inits = {t.name for t in proto.graph.initializer}
    graph_inputs = [v for v in proto.graph.input if v.name not in inits]
    unknown = set(shapes) - {v.name for v in graph_inputs}
    if unknown:
        known = ", ".join(v.name for v in graph_inputs)
        raise BadInput(f"{model.source}: --shape names unknown input(s) {sorted(unknown)}; inputs are: {known}")
    for v in graph_inputs:
        dims = _dims(v)
        given = shapes.get(v.name)
        if given is not None and len(given) != len(dims):
            raise BadInput(f"{model.source}: --shape {v.name} has rank {len(given)}, the input has rank {len(dims)}")
        new = []
        for axis, d in enumerate(dims):
            if given is not None:
                if isinstance(d, int) and d > 0 and d != given[axis]:
                    raise BadInput(
                        f"{model.source}: --shape {v.name} sets dim {axis} to {given[axis]}, the model fixes it to {d}"
                    )
                new.append(given[axis])
            elif isinstance(d, int) and d > 0:
                new.append(d)
            elif axis == 0:
                new.append(batch)
            else:
                raise BadInput(
                    f"{model.source}: input '{v.name}' has dynamic dim {axis} ('{d or '?'}'); "
                    f"fix it with --shape {v.name}=" + ",".join(str(x) if isinstance(x, int) and x > 0 else "N" for x in dims)
                )
        shape_proto = v.type.tensor_type.shape
        for dim, value in zip(shape_proto.dim, new):
            dim.Clear()
            dim.dim_value = value
    # Stale intermediate shapes would hide the new static ones from inference.
    del proto.graph.value_info[:]
    for out in proto.graph.output:
        out.type.tensor_type.ClearField("shape")
    return Model(infer_shapes(proto, model.source), model.source)
