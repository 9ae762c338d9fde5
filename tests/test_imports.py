"""The package's import structure: no cycles, imports at module top, every module importable first.

A cycle between modules works or fails depending on which module is imported first; function-level
imports used to hide such cycles. Here (1) the static graph of module-level imports inside the package
must be acyclic, (2) imports inside functions are allowed only for optional dependencies named below,
and (3) every module is imported first in a fresh set of ``emag`` modules.
"""

import ast
import subprocess
import sys
from pathlib import Path

import emag

SRC = Path(emag.__file__).parent
PACKAGE = "emag"
# imports that may stay inside functions: optional or heavy dependencies that only some calls need
ALLOWED_INNER = {"sklearn.datasets", "matplotlib", "matplotlib.pyplot",  # optional: emag[eval]
                 "torch_fidelity.feature_extractor_inceptionv3", "torch_fidelity.metric_isc", "torch_fidelity.metric_kid",
                 "open_clip", "torchvision",
                 "gradio"}  # optional: emag[demo]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def top_level_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports when it is imported (module level, not under TYPE_CHECKING)."""
    out = set()
    tree = ast.parse(path.read_text())
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            stack.extend(getattr(node, "body", []) + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
            for h in getattr(node, "handlers", []):
                stack.extend(h.body)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(PACKAGE + ".") or a.name == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, path, node)
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
    return {m for m in out if m in known and m != module}


def test_the_module_graph_has_no_cycle():
    mods = modules()
    known = set(mods)
    graph = {m: top_level_imports(m, p, known) for m, p in mods.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 40  # the walk really saw the package


def test_imports_are_at_module_top():
    inner = []
    for m, p in modules().items():
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [_absolute(m, p, node)]
                else:
                    continue
                inner += [f"{m}:{node.lineno} {n}" for n in names if n not in ALLOWED_INNER]
    assert inner == []


def test_every_module_imports_first():
    """Each module imported first, with every other ``emag`` module unloaded (one interpreter, torch and
    diffusers stay loaded, so this takes seconds)."""
    code = f"""
import importlib, sys
names = {sorted(modules())!r}
failed = []
for name in names:
    for loaded in [k for k in sys.modules if k == "emag" or k.startswith("emag.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
