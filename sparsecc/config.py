"""Build recipes: a `sparsecc.toml` holding everything `sparsecc compile` (and `bench`) would take as flags.

A recipe maps onto the command-line options one to one, so a build-pipeline step is one line
(`sparsecc compile model.onnx --config sparsecc.toml`) and any flag given on the command line overrides the
recipe's value. `--config PATH` names the file; without it, `./sparsecc.toml` in the current directory is used
when present (`--no-config` ignores it). Paths in a recipe are relative to the recipe's folder. Unknown keys
and values of the wrong type are refused with one line naming the key.

```toml
target = ["cpu", "arm64"]     # or "cpu"; one artifact per target
output = "build/model"        # with several targets: build/model/<target>
batch = 1
threads = 4
tolerance = 1e-4
calib = "calib.npz"
[shapes]
input = [1, 3, 224, 224]
[prune]
ratio = 0.3
criterion = "obspa"
[sparsify]
sparsity = 0.5
pattern = "block:4x4"
[tune]
trials = 200
db = "tuning-db"
[target_options]
mcpu = "cortex-a76"
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput, one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_NAME = "sparsecc.toml"


@dataclass(frozen=True)
class Key:
    """One recipe key: the command-line parameter it sets and the kind of value it takes."""

    param: str
    kind: str  # int | float | bool | str | path | strs | targets | shapes
    minimum: int | None = None  # for ints, as the command line checks them


SCHEMA: dict[str, Key] = {
    "target": Key("target", "targets"),
    "output": Key("output", "path"),
    "batch": Key("batch", "int", 1),
    "shapes": Key("shape", "shapes"),
    "verify": Key("verify", "bool"),
    "inputs": Key("inputs", "path"),
    "tolerance": Key("tolerance", "float"),
    "threads": Key("threads", "int", 1),
    "calib": Key("calib", "path"),
    "dump_dir": Key("dump_dir", "path"),
    "sweep": Key("sweep", "bool"),
    "tune.trials": Key("tune", "int", 0),
    "tune.db": Key("tune_db", "path"),
    "prune.ratio": Key("prune", "float"),
    "prune.criterion": Key("criterion", "str"),
    "prune.round_to": Key("round_to", "int", 1),
    "prune.global": Key("global_", "bool"),
    "prune.ignore": Key("ignore", "strs"),
    "prune.max_layer_ratio": Key("max_layer_ratio", "float"),
    "prune.attention": Key("attention", "str"),
    "sparsify.sparsity": Key("sparsity", "float"),
    "sparsify.pattern": Key("pattern", "str"),
    "target_options.mcpu": Key("mcpu", "str"),
    "target_options.mattr": Key("mattr", "strs"),
    "target_options.arch": Key("arch", "str"),
    "target_options.dtype": Key("dtype", "str"),
    "bench.warmup": Key("warmup", "int", 0),
    "bench.repeat": Key("repeat", "int", 1),
}
TABLES = sorted({k.split(".")[0] for k in SCHEMA if "." in k})


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: command-line parameter name -> value."""

    path: Path
    values: dict[str, Any]


def _flatten(data: dict[str, Any], path: Path) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise BadInput(f"{path}: '{key}' must be a table ([{key}])")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _is(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("str", "path"):
        return isinstance(value, str)
    if kind == "strs":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "targets":
        return isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
    if kind == "shapes":
        return isinstance(value, dict) and all(isinstance(d, list) and all(_is(x, "int") for x in d)
                                               for d in value.values())
    raise AssertionError(kind)


EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "path": "a path string", "strs": "a list of strings", "targets": "a target or a list of targets",
            "shapes": "a table of NAME = [d0, d1, ...]"}


def _convert(value: Any, key: Key, base: Path) -> Any:
    if key.kind == "path":
        return base / value
    if key.kind == "float":
        return float(value)
    if key.kind == "targets":
        return ",".join(value) if isinstance(value, list) else value
    if key.kind == "shapes":
        return [f"{name}={','.join(map(str, dims))}" for name, dims in value.items()]
    return value


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe; values come back under the command-line parameter names."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"{path}: not a readable TOML file ({one_line(e)})") from None
    values: dict[str, Any] = {}
    for name, value in _flatten(data, path).items():
        key = SCHEMA.get(name)
        if key is None:
            raise BadInput(f"{path}: unknown key '{name}' (known: {', '.join(sorted(SCHEMA))})")
        if not _is(value, key.kind):
            raise BadInput(f"{path}: '{name}' must be {EXPECTED[key.kind]}, got {value!r}")
        if key.minimum is not None and value < key.minimum:
            raise BadInput(f"{path}: '{name}' must be >= {key.minimum}, got {value}")
        values[key.param] = _convert(value, key, path.parent)
    return Recipe(path, values)


def find_recipe(config: Path | None, no_config: bool = False, cwd: Path | None = None) -> Recipe | None:
    """The recipe named by `--config`, else `./sparsecc.toml` when present (unless `--no-config`)."""
    if config is not None:
        return load_recipe(config)
    default = (cwd or Path.cwd()) / DEFAULT_NAME
    if no_config or not default.is_file():
        return None
    return load_recipe(default)
