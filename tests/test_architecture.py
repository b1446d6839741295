"""The layering rules of docs/ARCHITECTURE.md, checked on the real imports of every module.

Every `.py` file of `llada2_jax/` and `kernels_pallas/` is parsed with `ast`; every import
statement counts, including those inside functions (a lazy import is still a dependency).
Relative imports are resolved; `from pkg import name` counts as an import of the module
`pkg.name` when that module exists, else of `pkg`.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("llada2_jax", "kernels_pallas")

# A layer may import only these layers (besides itself).
ONLY = {
    "core": set(),
    "kernels_pallas": {"core"},
    "ops": {"core", "kernels_pallas"},
    "model": {"core", "ops"},
}
# A layer must not import these layers.
FORBIDDEN = {
    "diffusion": {"training", "inference", "model"},
    "inference": {"training"},
    "data": {"model", "interop"},
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the checked packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a non-module attribute path
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imports_of(module, path, set(files)) for module, path in files.items()}


def layer(module: str) -> str:
    """`kernels_pallas` for the kernels, else the sub-package (or top module) of llada2_jax."""
    parts = module.split(".")
    if parts[0] == "kernels_pallas" or len(parts) == 1:
        return parts[0]
    return parts[1]


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        src = layer(module)
        for target in sorted(targets):
            dst = layer(target)
            if dst == src:
                continue
            if src in ONLY and dst not in ONLY[src]:
                allowed = ", ".join(sorted(ONLY[src])) or "nothing else from the package"
                found.append(f"{module} imports {target}: {src} may import only {allowed}")
            elif dst in FORBIDDEN.get(src, ()):
                found.append(f"{module} imports {target}: {src} must not import {dst}")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_layering_rules_hold():
    problems = violations(import_graph())
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_graph_sees_real_imports():
    """The walk finds module-level, function-level, relative and `from pkg import module` imports."""
    graph = import_graph()
    assert "llada2_jax.ops" in graph["llada2_jax.model.transformer"]  # from llada2_jax import ops
    assert "llada2_jax.core.masks" in graph["llada2_jax.model.transformer"]
    assert "llada2_jax.ops.sharded" in graph["llada2_jax.model.moe"]
    assert "kernels_pallas.block_sparse_attention.gpu" in graph["llada2_jax.ops.backends"]  # inside a function
    assert {"kernels_pallas.tilemap", "llada2_jax.core.masks"} <= graph["kernels_pallas.block_sparse_attention.tpu"]
    assert layer("kernels_pallas.tilemap") == "kernels_pallas" and layer("llada2_jax.core.axes") == "core"
    assert layer("llada2_jax.main") == "main"


def test_checker_flags_forbidden_imports_and_cycles(tmp_path):
    """The rules and the cycle search reject planted bad imports (so a passing run means something)."""
    planted = {
        "llada2_jax.model.transformer": {"llada2_jax.training.sharding"},
        "kernels_pallas.tilemap": {"llada2_jax.diffusion.masks"},
        "llada2_jax.core.masks": {"llada2_jax.ops.attention"},
        "llada2_jax.data.tokenizers": {"llada2_jax.interop.gguf"},
        "llada2_jax.inference.decode": {"llada2_jax.training.run"},
        "llada2_jax.diffusion.losses": {"llada2_jax.training.trainer"},
        "llada2_jax.training.run": {"llada2_jax.model.transformer"},  # allowed
    }
    problems = violations(planted)
    assert len(problems) == 6 and not any(p.startswith("llada2_jax.training") for p in problems), problems
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    # a relative import inside a function is resolved against the importing module
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ..training import run\n    from . import layout\n")
    known = {"llada2_jax.training.run", "llada2_jax.diffusion.layout", "llada2_jax.diffusion"}
    assert imports_of("llada2_jax.diffusion.x", src, known) == {"llada2_jax.training.run",
                                                                "llada2_jax.diffusion.layout"}
