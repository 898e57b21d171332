"""Pass protocol, pass and target registries, and the compile pipeline.

compile = load -> fix shapes -> simplify -> named passes -> codegen for a target -> artifact -> verify.
Passes (`sparsecc.passes`) and targets (`sparsecc.codegen`) register themselves here by name; this module
imports those packages only to let them register, never their internals. A `PassContext` carries the options,
the per-pass timings and the optional dump directory (the ONNX model after every pass).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from .errors import BadInput, Unsupported
from .ir import Model

PLUGIN_PACKAGES = ("sparsecc.passes", "sparsecc.codegen")


class Pass(Protocol):
    """An ONNX-level transformation with a name and one entry point."""

    name: str

    def __call__(self, model: Model, ctx: PassContext) -> Model: ...


@dataclass(frozen=True)
class BuildResult:
    """What a target backend wrote into the artifact directory."""

    files: tuple[str, ...]  # relative names of the files it produced
    runtime: dict[str, Any]  # how a loader runs it: {"kind": ..., "library": ...}
    target: dict[str, Any]  # the resolved target, recorded in the manifest
    report: dict[str, Any] = field(default_factory=dict)  # per-layer kernel choices etc.
    cannot_run: str | None = None  # why this machine cannot run the artifact (verification is then skipped)


class Backend(Protocol):
    """Code generation for one target family."""

    def build(self, model: Model, out_dir: Path, ctx: PassContext) -> BuildResult: ...


@dataclass
class PassContext:
    """Options and instrumentation shared by the stages of one compile."""

    options: dict[str, Any] = field(default_factory=dict)
    dump_dir: Path | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True))
    quiet: bool = False
    timings: list[dict[str, Any]] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)  # deterministic per-pass summaries

    @contextmanager
    def stage(self, name: str, kind: str = "stage") -> Iterator[None]:
        start = time.perf_counter()
        if self.quiet:
            yield
        else:
            with self.console.status(f"[bold]{name}[/]…", spinner="dots") as status:
                token = _STATUS.set(lambda text: status.update(f"[bold]{name}[/]… {text}"))
                try:
                    yield
                finally:
                    _STATUS.reset(token)
        seconds = time.perf_counter() - start
        self.timings.append({"name": name, "kind": kind, "seconds": round(seconds, 4)})
        if not self.quiet:
            self.console.print(f"  [green]✓[/] {name} [dim]{seconds:.2f}s[/]")

    def dump(self, index: int, name: str, model: Model) -> None:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            model.save(self.dump_dir / f"{index:02d}_{name}.onnx")


_STATUS: ContextVar[Callable[[str], None] | None] = ContextVar("sparsecc_stage_status", default=None)


def report_progress(text: str) -> None:
    """Show `text` beside the running stage's spinner (tuning trials, layers measured); a no-op when quiet."""
    show = _STATUS.get()
    if show is not None:
        show(text)


_PASSES: dict[str, Callable[..., Pass]] = {}
_TARGETS: dict[str, Callable[[dict[str, Any]], Backend]] = {}
_TARGET_ALIASES: dict[str, str] = {}
_ANALYSES: dict[str, Callable[..., Any]] = {}
_TOOLCHAINS: dict[str, Callable[[bool], dict[str, Any]]] = {}
_plugins_loaded = False


def register_pass(name: str) -> Callable:
    """Decorator: register a pass factory `factory(**options) -> Pass` under `name`."""

    def deco(factory: Callable[..., Pass]) -> Callable[..., Pass]:
        _PASSES[name] = factory
        return factory

    return deco


def register_target(name: str, *aliases: str) -> Callable:
    """Decorator: register a backend factory `factory(target_options) -> Backend` under `name`."""

    def deco(factory: Callable[[dict[str, Any]], Backend]) -> Callable:
        _TARGETS[name] = factory
        for alias in aliases:
            _TARGET_ALIASES[alias] = name
        return factory

    return deco


def register_analysis(name: str) -> Callable:
    """Decorator: register a read-only analysis `fn(model, **options) -> JSON-able` (e.g. channel groups)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _ANALYSES[name] = fn
        return fn

    return deco


def register_toolchain(target: str) -> Callable:
    """Decorator: register `fn(install: bool) -> {"status": "ready", ...}` that checks (and, when `install`,
    fetches) the external tools a target needs: cross compilers, emulators, foreign runtimes. It raises
    `Unsupported` naming what is missing and how to get it."""

    def deco(fn: Callable[[bool], dict[str, Any]]) -> Callable[[bool], dict[str, Any]]:
        _TOOLCHAINS[target] = fn
        return fn

    return deco


def known_toolchains() -> list[str]:
    load_plugins()
    return sorted(_TOOLCHAINS)


def setup_toolchain(target: str, install: bool = False) -> dict[str, Any]:
    """Check (or install) the tools for `target`; targets without external tools are always ready."""
    name, _ = resolve_target(target)
    if name not in _TOOLCHAINS:
        return {"target": name, "status": "ready", "tools": {}}
    return {"target": name, **_TOOLCHAINS[name](install)}


def run_analysis(name: str, model: Model, **options: Any) -> Any:
    load_plugins()
    if name not in _ANALYSES:
        raise Unsupported(f"analysis '{name}' is not available")
    return _ANALYSES[name](model, **options)


def load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for pkg in PLUGIN_PACKAGES:
            importlib.import_module(pkg)


def known_passes() -> list[str]:
    load_plugins()
    return sorted(_PASSES)


def known_targets() -> list[str]:
    load_plugins()
    return sorted(_TARGETS)


def make_pass(name: str, **options: Any) -> Pass:
    load_plugins()
    if name not in _PASSES:
        raise BadInput(f"unknown pass '{name}'; known passes: {', '.join(sorted(_PASSES))}")
    return _PASSES[name](**options)


def resolve_target(spec: str) -> tuple[str, dict[str, Any]]:
    """Map a target spec to (backend name, options). A JSON object is a raw TVM target dict."""
    load_plugins()
    text = spec.strip()
    if text.startswith("{"):
        return "raw", {"tvm_target": text}
    name = _TARGET_ALIASES.get(text.lower(), text.lower())
    if name not in _TARGETS or name == "raw":
        known = ", ".join(n for n in sorted(_TARGETS) if n != "raw")
        raise Unsupported(f"unknown target '{spec}'; known targets: {known}, or a TVM target as JSON")
    return name, {}


def make_backend(spec: str, options: dict[str, Any]) -> Backend:
    name, extra = resolve_target(spec)
    return _TARGETS[name]({**options, **extra, "target_name": name})


class PassManager:
    """Runs passes in order, timing each and dumping the model after each when asked."""

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def __repr__(self) -> str:
        return "PassManager(" + " -> ".join(p.name for p in self.passes) + ")"

    def run(self, model: Model, ctx: PassContext, first_index: int = 1) -> Model:
        for i, p in enumerate(self.passes, start=first_index):
            with ctx.stage(p.name, kind="pass"):
                model = p(model, ctx)
            ctx.dump(i, p.name, model)
        return model
