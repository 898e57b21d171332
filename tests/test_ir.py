"""Loading and validating models: every bad input is refused with the right error type and a clear message."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import conv_model, make_model
from sparsecc.errors import BadInput, Unsupported
from sparsecc.ir import fix_input_shapes, load_model, parse_shape_option


def test_load_valid_model_infers_shapes(conv_path):
    m = load_model(conv_path)
    assert [s.name for s in m.inputs] == ["x"]
    assert m.inputs[0].shape == (-1, 3, 16, 16)
    assert m.outputs[0].dtype == "float32"
    fixed = fix_input_shapes(m, {}, batch=4)
    assert fixed.inputs[0].shape == (4, 3, 16, 16)
    assert fixed.outputs[0].shape == (4, 10)


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"\x00\xff\x13garbage" * 50, "not an ONNX model"),
    (b"hello, this is a text file\n", "not an ONNX model"),
])
def test_bad_bytes(tmp_path, content, message):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(BadInput, match=message):
        load_model(p)


def test_truncated_file(tmp_path, conv_path):
    p = tmp_path / "trunc.onnx"
    p.write_bytes(conv_path.read_bytes()[:500])
    with pytest.raises(BadInput, match="trunc.onnx"):
        load_model(p)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(BadInput, match="is a directory"):
        load_model(tmp_path)


def _single_op(op_type, domain="", opset=17):
    node = helper.make_node(op_type, ["x"], ["y"], domain=domain, name="the_node")
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], opset=opset)
    if domain:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def test_unknown_op_names_node_and_op():
    with pytest.raises(Unsupported, match=r"the_node.*FooBar"):
        load_model(_single_op("FooBar"))


def test_unknown_domain_is_unsupported():
    with pytest.raises(Unsupported, match="com.microsoft"):
        load_model(_single_op("DynamicQuantizeLSTM", domain="com.microsoft"))


def test_too_new_and_too_old_opset():
    with pytest.raises(Unsupported, match="newer"):
        load_model(_single_op("Relu", opset=99))
    with pytest.raises(Unsupported, match="older"):
        load_model(_single_op("Relu", opset=5))


def test_old_opset_is_upgraded():
    m = load_model(_single_op("Relu", opset=9))
    assert m.opset == 13


def test_invalid_graph_is_bad_input():
    # Add with a dangling input that nothing produces
    node = helper.make_node("Add", ["x", "ghost"], ["y"])
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(BadInput, match="invalid ONNX model"):
        load_model(model)


def test_dynamic_non_batch_dim_needs_shape():
    m = load_model(conv_model(batch="N"))
    model = onnx.ModelProto()
    model.CopyFrom(m.proto)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    m2 = load_model(model)
    with pytest.raises(BadInput, match=r"input 'x' has dynamic dim 2.*--shape x="):
        fix_input_shapes(m2)
    fixed = fix_input_shapes(m2, {"x": (2, 3, 16, 16)})
    assert fixed.inputs[0].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("text", ["x", "x=", "x=1,a", "=1,2", "x=0,3", "x=-1"])
def test_malformed_shape_option(text):
    with pytest.raises(BadInput, match="--shape"):
        parse_shape_option(text)


def test_shape_option_errors():
    m = load_model(conv_model())
    with pytest.raises(BadInput, match="unknown input"):
        fix_input_shapes(m, {"nope": (1,)})
    with pytest.raises(BadInput, match="rank"):
        fix_input_shapes(m, {"x": (1, 3)})
    with pytest.raises(BadInput, match="fixes it to 3"):
        fix_input_shapes(m, {"x": (1, 4, 16, 16)})


def test_external_data_outside_folder_is_refused(tmp_path):
    model = conv_model()
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    for loc in ("../secret.bin", "/etc/passwd"):
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=loc)
        with pytest.raises(BadInput, match="inside the model's folder"):
            load_model(_save(model, tmp_path))


def test_external_data_symlink_and_missing(tmp_path):
    model = conv_model()
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.external_data.add(key="location", value="weights.bin")
    path = _save(model, tmp_path)
    with pytest.raises(BadInput, match="not found"):
        load_model(path)
    outside = tmp_path.parent / f"{tmp_path.name}_outside.bin"
    outside.write_bytes(np.zeros(216, np.float32).tobytes())
    (tmp_path / "weights.bin").symlink_to(outside)
    with pytest.raises(BadInput, match="outside the model's folder"):
        load_model(path)


def test_external_data_inside_folder_loads(tmp_path):
    model = conv_model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    m = load_model(tmp_path / "m.onnx")
    assert set(m.initializers()) == {"w", "b", "fc"}


def _save(model, folder):
    path = folder / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_absurd_dimension_refused():
    model = conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 1 << 40
    with pytest.raises(BadInput, match="absurd"):
        load_model(model)


def _io(name="x", shape=(1, 4)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


@pytest.mark.parametrize("nodes, inputs, outputs, inits, message", [
    ([helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
      helper.make_node("Identity", ["a"], ["y"])], [_io()], [_io("y")], [], "topologically sorted"),
    ([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["y"])],
     [_io()], [_io("y")], [], "SSA"),
    ([helper.make_node("MatMul", ["x", "w"], ["y"])], [_io()], [_io("y")],
     [onnx.numpy_helper.from_array(np.zeros((5, 4), np.float32), "w")], "Incompatible dimensions"),
    ([helper.make_node("Conv", ["x", "w"], ["y"])], [_io("x", (1, 1, 4, 4))], [_io("y", (1, 2, 4, 4))],
     [onnx.numpy_helper.from_array(np.zeros((2, 1, 1, 1), np.int32), "w")], "int32"),
    ([helper.make_node("Relu", ["x"], ["y"])], [_io("x", (1, 0))], [_io("y", (1, 0))], [], "zero-size"),
    ([helper.make_node("Relu", ["x"], ["y"])], [_io()], [], [], "no outputs"),
])
def test_invalid_graphs(nodes, inputs, outputs, inits, message):
    with pytest.raises(BadInput, match=message):
        load_model(make_model(nodes, inputs, outputs, inits))


def test_short_raw_data():
    t = onnx.numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")
    t.raw_data = t.raw_data[:10]
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_io()], [_io("y")], [t])
    with pytest.raises(BadInput, match="too small"):
        load_model(model)
