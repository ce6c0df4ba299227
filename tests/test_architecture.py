"""The shape a newcomer can rely on: no import cycles (imports inside functions count), no module
over 600 lines, no class over 400, and no module importing another module's ``_private`` names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The installed package's layout: envs/ and policies/ are top-level folders installed as
# rtlm_adapt.envs and rtlm_adapt.policies (pyproject's package-dir).
PACKAGES = {"rtlm_adapt": ROOT / "rtlm_adapt", "rtlm_adapt.envs": ROOT / "envs",
            "rtlm_adapt.policies": ROOT / "policies"}  # fmt: skip
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
#: Classes still over the limit, each held at its present size until it is split (a ratchet: it
#: may shrink, never grow; an entry goes when its class is split).
OVERSIZE_CLASSES: dict[str, int] = {
    # empty since session 19: AdaptiveController (409 lines in session 18) is back under 400, its
    # running requests, work ahead and arrival counting each in their own part
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            # rtlm_adapt/envs does not exist: the subpackages come from their own folders
            found.setdefault(name, path)
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        package = package.rsplit(".", 1)[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import in the module, anywhere."""
    tree = ast.parse(MODULES[module].read_text())
    out: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                # "from package import submodule" imports the submodule
                out.append((full, None) if full in MODULES else (base, alias.name))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = set()
        for target, _ in _imports(module):
            # importing a.b.c runs a/__init__ and a/b/__init__ too, but those edges are the
            # package's own business: the edge that matters is to the module named
            while target and target not in MODULES:
                target = target.rsplit(".", 1)[0] if "." in target else ""
            if target and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _is_package_init(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its submodules, and those submodules importing siblings
    # through the package, is not a design cycle: leave the __init__ edges out.
    graph = {m: {t for t in ts if not _is_package_init(t)} for m, ts in graph.items()}
    assert _cycles(graph) == []


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_and_class_sizes(module):
    source = MODULES[module].read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            lines = node.end_lineno - node.lineno + 1
            limit = OVERSIZE_CLASSES.get(node.name, MAX_CLASS_LINES)
            assert lines <= limit, f"class {node.name}: {lines} lines"


def test_no_module_imports_another_modules_private_names():
    offences = []
    for module in MODULES:
        for target, name in _imports(module):
            if name and name.startswith("_") and not name.startswith("__"):
                if target.startswith("rtlm_adapt") and target != module:
                    offences.append(f"{module} imports {target}.{name}")
    assert offences == []
