"""The architecture, enforced: which layer may import which, no import cycles, small modules.

Layers, bottom up: `iteris_sd.settings` / `progress` / `seeds`, `iteris_sd.lora` (the
LoRA form and files), `iteris_sd.merge` (the algorithm), `iteris_sd.backends` (models),
`iteris_sd.app` (pipeline, recipe, CLI); beside them `iteris_demo` (the toy world) and
`nodes` (ComfyUI). Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("iteris_sd", "iteris_demo", "nodes")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (function-level imports too), as absolute names."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names)  # `from . import x`
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


SOURCES = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
GRAPH = {m: {i for i in _imports(p) if i in SOURCES and i != m} for m, p in SOURCES.items()}
ALL_IMPORTS = {m: _imports(p) for m, p in SOURCES.items()}

# layer -> prefixes it must never import
FORBIDDEN = {
    "iteris_sd.settings": ("iteris_sd.lora", "iteris_sd.merge", "iteris_sd.backends", "iteris_sd.app"),
    "iteris_sd.progress": ("iteris_sd.lora", "iteris_sd.merge", "iteris_sd.backends", "iteris_sd.app"),
    "iteris_sd.seeds": ("iteris_sd.lora", "iteris_sd.merge", "iteris_sd.backends", "iteris_sd.app"),
    "iteris_sd.lora": ("iteris_sd.merge", "iteris_sd.backends", "iteris_sd.app"),
    "iteris_sd.merge": ("iteris_sd.backends", "iteris_sd.app"),
    "iteris_sd.backends": ("iteris_sd.app",),
    "iteris_sd": ("iteris_demo", "nodes", "comfy", "comfy_api", "folder_paths", "server"),
}


def _violations(prefix: str, banned: tuple[str, ...]) -> list[str]:
    return [f"{m} imports {i}" for m, imports in ALL_IMPORTS.items() if m == prefix or m.startswith(prefix + ".")
            for i in sorted(imports) if any(i == b or i.startswith(b + ".") for b in banned)
            and not (prefix == "iteris_sd" and m == "iteris_sd.app.cli" and i.startswith("iteris_demo"))]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(layer):
    """The CLI's demo, bench and scale commands are the one place the core's app layer reaches
    the demo package (lazily, inside those commands)."""
    assert _violations(layer, FORBIDDEN[layer]) == []


def test_no_module_imports_itself_back_through_others():
    state, stack, cycles = {}, [], []

    def walk(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            walk(m)
    assert cycles == []


def test_the_check_sees_the_imports_it_forbids():
    """The rules above mean something only if the parser resolves relative imports."""
    assert "iteris_sd.merge.plan" in GRAPH["iteris_sd.merge.chunks"]
    assert "iteris_sd.lora.layer" in GRAPH["iteris_sd.merge.backend"]
    assert "iteris_demo.run" in ALL_IMPORTS["iteris_sd.app.cli"]
    assert "iteris_sd.merge.calibration" not in GRAPH["iteris_sd.merge.measure"]  # TYPE_CHECKING only


def test_every_module_of_the_core_is_a_few_hundred_lines_at_most():
    long = {m: n for m, p in SOURCES.items() if m.startswith("iteris_sd")
            and (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
