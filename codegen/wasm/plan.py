"""Static execution plan: a lowered Relax `main` as a fixed sequence of kernel calls over one arena.

Input is the module after the shared Relax pipeline has legalized, scheduled and lowered every operator to
a PrimFunc called in destination-passing style, and `StaticPlanBlockMemory` + `LowerAllocTensor` have
planned the intermediate storage. Shapes are static, so `main` is straight-line code: walking its bindings
gives every tensor a fixed place in one arena (inputs, the planned storages, then the constants) and every
PrimFunc call a fixed argument list. Each binding kind is handled by one entry of `_OPS` (or by the value's
type); anything else is refused with one line naming it, rather than compiled wrongly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from sparsecc.errors import Unsupported

ALIGN = 64  # TVM kernels assume 64-byte aligned buffers
# Kernels that call back into TVM's runtime (sorting, random numbers, ...) need functions the static
# executor does not have; TIR has no Python visitor here, so they are found in the printed kernel.
_PACKED_CALL = re.compile(r'T\.call_c?packed\w*\("([^"]+)"')


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Tensor:
    """A DLTensor whose data lives at `offset` in the arena."""

    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * tvm.runtime.DataType(self.dtype).itemsize


@dataclass(frozen=True)
class Scalar:
    """An integer argument passed by value."""

    value: int


@dataclass(frozen=True)
class KernelCall:
    """One packed call: `kernel(*args)`, each arg a tensor index or a `Scalar`."""

    kernel: str
    args: tuple[int | Scalar, ...]


@dataclass
class StaticPlan:
    tensors: list[Tensor] = field(default_factory=list)
    calls: list[KernelCall] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)  # tensor indices, in `main`'s parameter order
    outputs: list[int] = field(default_factory=list)  # tensor indices, tuples flattened in order
    params: bytearray = field(default_factory=bytearray)  # the constants, laid out from `params_offset`
    params_offset: int = 0
    arena_bytes: int = 0
    kernels: dict[str, tirx.PrimFunc] = field(default_factory=dict)  # called PrimFuncs by symbol

    def add(self, tensor: Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1


@dataclass(frozen=True)
class _Storage:
    offset: int
    nbytes: int


def _ints(shape_expr: Any) -> tuple[int, ...]:
    values = getattr(shape_expr, "values", shape_expr)
    out = []
    for v in values:
        if not isinstance(v, tirx.IntImm):
            raise Unsupported(f"wasm: dynamic shape {shape_expr} (the static executor needs static shapes)")
        out.append(int(v))
    return tuple(out)


def _tensor_type(expr: relax.Expr) -> tuple[tuple[int, ...], str]:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise Unsupported(f"wasm: value '{expr}' of type {ty} is not a static tensor")
    return _ints(ty.shape), str(ty.dtype)


class _Planner:
    def __init__(self, mod: tvm.IRModule):
        self.mod = mod
        self.plan = StaticPlan()
        self.env: dict[relax.Var, Any] = {}
        self.top = 0  # arena bytes used by inputs and storages
        self.constants: dict[str, int] = {}  # content key -> tensor index (deduplicated constants)
        self.params: list[tuple[int, np.ndarray]] = []  # (tensor index, value), laid out after the storages
        self.params_bytes = 0

    # ---- values
    def _alloc(self, nbytes: int) -> int:
        offset = self.top
        self.top += _align(max(nbytes, 1))
        return offset

    def _constant(self, const: tvm.ir.Constant) -> int:
        value = const.value.numpy().copy(order="C")  # (np.ascontiguousarray makes a 0-d array 1-d)
        key = hashlib.sha1(f"{value.dtype}{value.shape}".encode() + value.tobytes()).hexdigest()
        if key not in self.constants:  # offset relative to the params region until `_layout_params`
            index = self.plan.add(Tensor(self.params_bytes, tuple(int(d) for d in value.shape), str(value.dtype)))
            self.params.append((index, value))
            self.params_bytes += _align(max(value.nbytes, 1))
            self.constants[key] = index
        return self.constants[key]

    def value(self, expr: relax.Expr) -> Any:
        if isinstance(expr, relax.Var):
            if expr not in self.env:
                raise Unsupported(f"wasm: '{expr.name_hint}' is used before it is bound")
            return self.env[expr]
        if isinstance(expr, tvm.ir.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            return self._constant(expr)
        if isinstance(expr, tirx.IntImm):
            return Scalar(int(expr))
        if isinstance(expr, relax.Tuple):
            return tuple(self.value(f) for f in expr.fields)
        if isinstance(expr, relax.TupleGetItem):
            return self.value(expr.tuple_value)[int(expr.index)]
        if isinstance(expr, relax.Call):
            return self.call(expr)
        raise Unsupported(f"wasm: the static executor cannot handle {type(expr).__name__} '{_short(expr)}'")

    def tensor(self, expr: relax.Expr) -> int:
        v = self.value(expr)
        if not isinstance(v, int):
            raise Unsupported(f"wasm: expected a tensor, got '{_short(expr)}'")
        return v

    # ---- calls
    def call(self, call: relax.Call) -> Any:
        if isinstance(call.op, tvm.ir.GlobalVar):
            return self.kernel_call(call)
        name = getattr(call.op, "name", None) or getattr(call.op, "global_symbol", None) or str(call.op)
        handler = _OPS.get(name)
        if handler is None:
            raise Unsupported(f"wasm: the static executor does not support {name} (in '{_short(call)}')")
        return handler(self, call)

    def kernel_call(self, call: relax.Call) -> None:
        func = self.mod[call.op]
        if not isinstance(func, tirx.PrimFunc):
            raise Unsupported(f"wasm: call of Relax function '{call.op.name_hint}' (expected TIR kernels only)")
        symbol = _symbol(call.op.name_hint)
        if symbol not in self.plan.kernels:
            runtime_calls = sorted(set(_PACKED_CALL.findall(func.script())))
            if runtime_calls:
                raise Unsupported(f"wasm: kernel '{symbol}' calls the TVM runtime function "
                                  f"{', '.join(runtime_calls)}, which the static executor does not provide")
            self.plan.kernels[symbol] = func.with_attr("global_symbol", symbol)
        args = []
        for a in call.args:
            v = self.value(a)
            if not isinstance(v, (int, Scalar)):
                raise Unsupported(f"wasm: kernel '{symbol}' takes an argument the static executor cannot pass")
            args.append(v)
        self.plan.calls.append(KernelCall(symbol, tuple(args)))
        return None

    def view(self, source: int, like: relax.Expr) -> int:
        shape, dtype = _tensor_type(like)
        src = self.plan.tensors[source]
        if Tensor(0, shape, dtype).nbytes != src.nbytes:
            raise Unsupported(f"wasm: reshape of {src.shape} to {shape} changes the size")
        return self.plan.add(Tensor(src.offset, shape, dtype))

    # ---- the function
    def run(self, func: relax.Function) -> StaticPlan:
        for p in func.params:
            shape, dtype = _tensor_type(p)
            index = self.plan.add(Tensor(self._alloc(Tensor(0, shape, dtype).nbytes), shape, dtype))
            self.plan.inputs.append(index)
            self.env[p] = index
        body = func.body
        for block in body.blocks:
            for binding in block.bindings:
                self.env[binding.var] = self.value(binding.value)
        self.plan.outputs = _flatten(self.value(body.body))
        self._layout_params()
        return self.plan

    def _layout_params(self) -> None:
        base = _align(self.top)
        plan = self.plan
        plan.params_offset = base
        for index, value in self.params:
            t = plan.tensors[index]
            plan.tensors[index] = Tensor(base + t.offset, t.shape, t.dtype)
            plan.params.extend(b"\0" * (t.offset - len(plan.params)))  # alignment padding
            plan.params.extend(value.tobytes())
        plan.arena_bytes = _align(base + len(plan.params))


def _flatten(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, tuple):
        return [i for v in value for i in _flatten(v)]
    raise Unsupported("wasm: the model returns a value that is not a tensor")


def _short(expr: Any) -> str:
    return " ".join(str(expr).split())[:120]


def _symbol(name: str) -> str:
    clean = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return clean if clean[:1].isalpha() else f"k_{clean}"


# ---- Relax operators the lowered `main` still contains, by name

def _alloc_storage(p: _Planner, call: relax.Call) -> _Storage:
    (nbytes,) = _ints(call.args[0])
    scope = str(call.args[2].value) if len(call.args) > 2 else "global"
    if scope != "global":
        raise Unsupported(f"wasm: storage scope '{scope}' is not supported")
    return _Storage(p._alloc(nbytes), nbytes)


def _alloc_tensor(p: _Planner, call: relax.Call) -> int:
    storage = p.value(call.args[0])
    offset = int(call.args[1])
    shape, dtype = _ints(call.args[2]), str(call.args[3].value)
    tensor = Tensor(storage.offset + offset, shape, dtype)
    if offset % ALIGN or offset + tensor.nbytes > storage.nbytes:
        raise Unsupported(f"wasm: tensor at offset {offset} does not fit its storage")
    return p.plan.add(tensor)


def _reshape(p: _Planner, call: relax.Call) -> int:
    return p.view(p.tensor(call.args[0]), call)


_OPS: dict[str, Callable[[_Planner, relax.Call], Any]] = {
    "relax.memory.alloc_storage": _alloc_storage,
    "relax.memory.alloc_tensor": _alloc_tensor,
    "relax.reshape": _reshape,
}


def plan_static(mod: tvm.IRModule, entry: str = "main") -> StaticPlan:
    """The static plan of `mod[entry]`, which must be lowered to destination-passing PrimFunc calls."""
    return _Planner(mod).run(mod[entry])


__all__ = ["ALIGN", "KernelCall", "Scalar", "StaticPlan", "Tensor", "plan_static"]
