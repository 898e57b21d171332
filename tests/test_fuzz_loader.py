"""Fuzz the loader with mutated bytes of a real model: it either loads or raises one of our errors."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecc.errors import SparseccError
from sparsecc.ir import load_model
from sparsecc.models import model_path

ORIGINAL = model_path("digits_mlp").read_bytes()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(ORIGINAL)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_mutated_model_bytes_give_clean_errors(tmp_path, data):
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    try:
        load_model(path)
    except SparseccError as e:
        assert str(e)
    except Exception as e:  # pragma: no cover - the failure we are looking for
        pytest.fail(f"loader crashed with {type(e).__name__}: {e}")
