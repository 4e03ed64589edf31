"""The layering docs/architecture.md states, held by the code: imports point down only,
and no import of the package's own modules hides inside a function."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "gpuprovider"

# layer -> layers it must never import
# isolation/ runs inside the task runner: standard library (and itself) only
EVERYTHING = {
    "domain", "scheduler", "store", "lifecycle", "backends", "service", "daemon", "api",
    "cli", "check", "proof", "inventory", "identity", "config", "home", "bootstrap",
    "testing", "telemetry", "market", "hub", "fleet", "pipelines", "rentals",
}  # fmt: skip
FORBIDDEN = {
    "isolation": EVERYTHING,
    "domain": {"store", "lifecycle", "service", "daemon", "api", "cli", "backends", "scheduler"},
    "scheduler": {"store", "lifecycle", "service", "daemon", "api", "cli", "backends", "market"},
    "telemetry": {"store", "lifecycle", "service", "daemon", "api", "cli", "backends", "scheduler"},
    "store": {"lifecycle", "service", "daemon", "api", "cli", "backends", "scheduler"},
    "lifecycle": {"service", "daemon", "api", "cli", "backends"},
    "backends": {"store", "lifecycle", "service", "daemon", "api", "cli"},
    "service": {"daemon", "api", "cli"},
    "api": {"store", "lifecycle", "daemon", "cli", "backends"},
    "daemon": {"api.routers", "cli"},
    # market/ is a library (model, pricing, usage, the hub's client, strategies and the
    # simulator, which place work with the scheduler library); hub/ is the hub app
    "market": {"store", "lifecycle", "service", "daemon", "api", "cli", "backends", "hub"},
    "hub": {"store", "lifecycle", "service", "daemon", "api", "cli", "backends", "scheduler"},
    # fleet/ drives hosts over SSH; the provider's API reaches it only through the
    # ProviderApi the CLI hands it
    "fleet": {"store", "lifecycle", "service", "daemon", "api", "cli", "backends", "scheduler"},
    # pipelines/ is a library: the spec, the two state tables, the status file
    "pipelines": {"store", "lifecycle", "service", "daemon", "api", "cli", "backends", "scheduler"},
    # rentals/ is what a node does for a rental (disks, host keys, the image): a library
    "rentals": {"store", "lifecycle", "service", "daemon", "api", "cli", "backends", "domain"},
}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, whether inside a function) for the package's own modules."""
    found = []
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    nested = {id(node) for f in functions for node in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("gpuprovider."):
                found.append((name.removeprefix("gpuprovider."), id(node) in nested))
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts)
# The lifecycle kernel is pure (the standard library only): the store raises its errors
# and the hub, which has a store of its own, builds its machines on it.
KERNEL = "lifecycle.kernel"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_point_down(path):
    layer = path.relative_to(PACKAGE).parts[0]
    for name, in_function in imports(path):
        assert not in_function, f"{name} imported inside a function: a cycle to fix instead"
        if name == KERNEL and layer in ("store", "hub"):
            continue
        for banned in FORBIDDEN.get(layer, ()):
            assert not (name == banned or name.startswith(banned + ".")), f"{layer}/ imports {name}"


def test_the_kernel_imports_nothing_of_the_package():
    kernel = PACKAGE / "lifecycle" / "kernel.py"
    assert imports(kernel) == []
    assert (PACKAGE / "lifecycle" / "__init__.py").read_text().count("import") == 0


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_imports(path):
    """What it names exists where it looks (ruff cannot tell a name moved away)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__main__":  # runs the CLI
        return
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    importlib.import_module(name)
