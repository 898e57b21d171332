"""A tiny, deterministic emitter of ONNX graphs from layers: the brick the zoo's synthetic builders stand on.

`GraphBuilder` appends nodes and float32 initializers with fresh, stable names and draws every weight from
one seeded `numpy.random.Generator`, so a builder called twice with the same seed serializes to the same
bytes. It knows the handful of layers the zoo uses (Conv with BatchNormalization, Gemm, MatMul+Add,
LayerNormalization, an Erf-based Gelu) and nothing about pruning or compilation; `finish` wraps the graph
in a model at opset 17 (what torch's TorchScript exporter writes by default) and IR 10 (onnxruntime-web
refuses IR above 13).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10


@dataclass
class GraphBuilder:
    """Accumulates one graph's nodes and weights; each layer method returns its output tensor name."""

    name: str
    seed: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def fresh(self, prefix: str) -> str:
        self._counts[prefix] += 1
        return f"{prefix}_{self._counts[prefix]}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def he_normal(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return self.rng.normal(0.0, math.sqrt(2.0 / fan_in), shape).astype(np.float32)

    def small_normal(self, prefix: str, shape: tuple[int, ...], scale: float = 0.1) -> str:
        return self.const(prefix, self.rng.normal(0.0, scale, shape).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        name = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    # --- layers -------------------------------------------------------------------------------------

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, group: int = 1) -> str:
        w = self.const("conv_w", self.he_normal((c_out, c_in // group, k, k), fan_in=(c_in // group) * k * k))
        pad = k // 2
        return self.op(
            "Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group
        )

    def batch_norm(self, x: str, c: int) -> str:
        # Statistics far from (0, 1) so that dropping or mis-folding BN changes the output visibly.
        gamma = self.const("bn_gamma", self.rng.uniform(0.5, 1.5, c).astype(np.float32))
        beta = self.small_normal("bn_beta", (c,))
        mean = self.small_normal("bn_mean", (c,))
        var = self.const("bn_var", self.rng.uniform(0.5, 1.5, c).astype(np.float32))
        return self.op("BatchNormalization", [x, gamma, beta, mean, var], epsilon=1e-5)

    def conv_bn(
        self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, group: int = 1, relu: bool = True
    ) -> str:
        y = self.batch_norm(self.conv(x, c_in, c_out, k, stride, group), c_out)
        return self.op("Relu", [y]) if relu else y

    def gemm(self, x: str, n_in: int, n_out: int) -> str:
        """A fully connected layer as Gemm(transB=1), weight stored [out, in] like torch.nn.Linear."""
        w = self.const("fc_w", self.he_normal((n_out, n_in), fan_in=n_in))
        b = self.small_normal("fc_b", (n_out,))
        return self.op("Gemm", [x, w, b], transB=1)

    def matmul_add(self, x: str, n_in: int, n_out: int) -> str:
        """A fully connected layer as torch exports it for N-d inputs: Add(b, MatMul(x, W^T)), bias first.

        Draws the same numbers as `gemm` would, so both styles of one seed compute the same function.
        """
        w_t = self.const("fc_wt", np.ascontiguousarray(self.he_normal((n_out, n_in), fan_in=n_in).T))
        b = self.small_normal("fc_b", (n_out,))
        return self.op("Add", [b, self.op("MatMul", [x, w_t])])

    def layer_norm(self, x: str, d: int) -> str:
        scale = self.const("ln_scale", self.rng.uniform(0.5, 1.5, d).astype(np.float32))
        return self.op(
            "LayerNormalization", [x, scale, self.small_normal("ln_bias", (d,))], axis=-1, epsilon=1e-5
        )

    def gelu(self, x: str) -> str:
        """Exact Gelu, 0.5 * x * (1 + erf(x / sqrt 2)), decomposed as torch exports it below opset 20."""
        scaled = self.op("Div", [x, self.const("sqrt2", np.array(math.sqrt(2.0), np.float32))])
        one_plus = self.op("Add", [self.op("Erf", [scaled]), self.const("one", np.array(1.0, np.float32))])
        return self.op("Mul", [self.op("Mul", [x, one_plus]), self.const("half", np.array(0.5, np.float32))])

    # --- model --------------------------------------------------------------------------------------

    def finish(
        self, output: str, input_shape: list[int | str], output_shape: list[int | str]
    ) -> onnx.ModelProto:
        """Wrap the graph as a model whose single input is "input" and single output is "logits"."""
        # Renaming the producer's output keeps the graph free of a trailing Identity.
        producer = next(n for n in self.nodes if output in n.output)
        producer.output[list(producer.output).index(output)] = "logits"
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, output_shape)],
            self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sparsecc.models"
        )
        model.ir_version = IR_VERSION
        return model
