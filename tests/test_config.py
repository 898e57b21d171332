"""Build-pipeline step: recipes (sparsecc.toml / --config) with flags overriding them, and several targets
compiled in one call (one artifact per target)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sparsecc
from sparsecc.compiler import compile_targets, split_targets
from sparsecc.config import find_recipe, load_recipe

RECIPE = """
target = ["cpu", "x86"]
output = "build/conv"
batch = 2
tolerance = 1e-3
[shapes]
x = [2, 3, 16, 16]
[prune]
ratio = 0.25
criterion = "l2"
ignore = ["fc"]
[sparsify]
sparsity = 0.5
pattern = "block:2x2"
[tune]
db = "tuning"
[target_options]
mattr = ["+avx2"]
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_recipe_maps_to_command_line_parameters(tmp_path):
    recipe = load_recipe(_write(tmp_path / "r.toml", RECIPE))
    v = recipe.values
    assert v["target"] == "cpu,x86" and v["batch"] == 2 and v["tolerance"] == pytest.approx(1e-3)
    assert v["output"] == tmp_path / "build/conv" and v["tune_db"] == tmp_path / "tuning"  # relative to the file
    assert v["shape"] == ["x=2,3,16,16"]
    assert (v["prune"], v["criterion"], v["ignore"]) == (0.25, "l2", ["fc"])
    assert (v["sparsity"], v["pattern"], v["mattr"]) == (0.5, "block:2x2", ["+avx2"])


@pytest.mark.parametrize("text, message", [
    ("batchh = 2", "unknown key 'batchh'"),
    ("[prune]\nratoi = 0.3", "unknown key 'prune.ratoi'"),
    ("batch = 'two'", "'batch' must be an integer"),
    ("batch = 0", "'batch' must be >= 1"),
    ("prune = 0.3", "'prune' must be a table"),
    ("[shapes]\nx = [1, 'a']", "'shapes' must be a table of NAME"),
    ("batch = ", "not a readable TOML file"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(sparsecc.BadInput, match=message) as e:
        load_recipe(_write(tmp_path / "r.toml", text))
    assert "\n" not in str(e.value)


def test_recipe_discovery(tmp_path):
    assert find_recipe(None, cwd=tmp_path) is None
    _write(tmp_path / "sparsecc.toml", "batch = 4")
    assert find_recipe(None, cwd=tmp_path).values == {"batch": 4}
    assert find_recipe(None, no_config=True, cwd=tmp_path) is None
    with pytest.raises(sparsecc.BadInput, match="no such config file"):
        find_recipe(tmp_path / "missing.toml")


def test_cli_compile_from_recipe_with_flag_override(cli, tmp_path, conv_path):
    recipe = _write(tmp_path / "r.toml", 'target = ["cpu", "x86"]\noutput = "out"\nbatch = 2\n'
                                         '[sparsify]\nsparsity = 0.5\npattern = "block:2x2"\n')
    r = cli("compile", conv_path, "--config", recipe, "--batch", "3", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["config"] == str(recipe)
    assert [Path(a["artifact"]) for a in data["artifacts"]] == [tmp_path / "out" / "cpu", tmp_path / "out" / "x86"]
    for a in data["artifacts"]:
        assert a["verification"]["status"] == "passed"
        assert a["inputs"][0]["shape"] == [3, 3, 16, 16]  # the flag won over the recipe's batch = 2
        manifest = json.loads((Path(a["artifact"]) / "manifest.json").read_text())
        assert manifest["options"]["passes"][0][0] == "sparsify"
        assert {"report.html", "report.json", "model.onnx"} <= set(manifest["files"])
    m_cpu, m_x86 = (json.loads((tmp_path / "out" / t / "manifest.json").read_text()) for t in ("cpu", "x86"))
    assert m_cpu["files"]["model.onnx"] == m_x86["files"]["model.onnx"]  # the passes ran once


def test_cli_picks_up_sparsecc_toml_in_cwd(cli, tmp_path, conv_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "sparsecc.toml", "batch = 2\n")
    r = cli("compile", conv_path, "-o", tmp_path / "a", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["inputs"][0]["shape"] == [2, 3, 16, 16]
    r = cli("compile", conv_path, "-o", tmp_path / "b", "--no-config", "--json")
    assert json.loads(r.out)["inputs"][0]["shape"] == [1, 3, 16, 16]
    _write(tmp_path / "sparsecc.toml", "[prune]\nration = 0.2\n")
    r = cli("compile", conv_path, "-o", tmp_path / "c")
    assert r.code == 2 and r.err.count("\n") == 1 and "unknown key 'prune.ration'" in r.err
    assert not (tmp_path / "c").exists()


def test_split_targets_keeps_json_targets_whole():
    raw = '{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake"}'
    assert split_targets(f"cpu, {raw},x86") == ["cpu", raw, "x86"]
    assert split_targets(["cpu,x86", "x86_64"]) == ["cpu", "x86", "x86_64"]
    with pytest.raises(sparsecc.BadInput, match="no target"):
        split_targets(" , ")


def test_compile_targets_one_artifact_per_target(tmp_path, conv_path):
    from sparsecc.codegen.targets import host_cpu

    raw = json.dumps({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": host_cpu()})
    arts = compile_targets(conv_path, f"cpu,{raw}", output=tmp_path / "o", threads=1)
    assert [a.path for a in arts] == [tmp_path / "o" / "cpu", tmp_path / "o" / "raw"]
    assert [a.manifest["target"]["name"] for a in arts] == ["cpu", "raw"]
    for a in arts:
        assert a.verification["status"] == "passed"
        assert sparsecc.load(a.path).run({"x": __import__("numpy").zeros((1, 3, 16, 16), "float32")})


def test_unknown_target_in_a_list_writes_nothing(tmp_path, conv_path):
    with pytest.raises(sparsecc.Unsupported, match="unknown target 'tpu'"):
        compile_targets(conv_path, "cpu,tpu", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()
