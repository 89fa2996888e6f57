"""Imports point one way: no two kvpass modules import each other, directly or around a loop,
counting the imports inside functions (a deferred import hides a cycle, it does not remove it)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvpass": "kvpass", "passes": "kvpass.passes", "kernels": "kvpass.kernels"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The kvpass modules ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known and m not in (name, "kvpass")}  # the package's own __init__ re-exports


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items() if m != "kvpass"}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


# The architecture, bottom up: a module imports only from its own layer and the layers below it.
# extras and default_model are leaves any layer may use; the package's __init__ and the CLI sit on top.
LAYERS = [
    ["kvpass.extras", "kvpass.default_model", "kvpass.data"],
    ["kvpass.kernels", "kvpass.passes"],
    ["kvpass.policies"],
    ["kvpass.runtime"],
    ["kvpass.transform"],
    ["kvpass.export", "kvpass.train", "kvpass.serving"],
    ["kvpass.eval"],
    ["kvpass.cli"],
]


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} belongs to no layer of LAYERS")


def test_imports_point_down_the_layers():
    known = modules()
    upward = sorted(
        f"{m} -> {i}" for m, p in known.items() if m != "kvpass" for i in imports(m, p, known) if layer(i) > layer(m)
    )
    assert not upward, f"imports pointing up the layers: {upward}"
