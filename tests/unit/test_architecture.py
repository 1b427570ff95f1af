"""The layout rules of docs/architecture.md, checked on the source: dependencies point one way
(train -> integrations -> {loss, data, memory} -> core), one module talks to torch.distributed, no
module reads another's private names, no print in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ulysses_sp"
#: the layer of each subpackage; a module may import its own subpackage and lower layers only
LAYERS = {"core": 0, "loss": 1, "data": 1, "memory": 1, "integrations": 2, "train": 3}
COMM = "ulysses_sp.core.comm"


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text()))
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names, relative imports resolved."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every import of ``module``, function-level ones included."""
    path, tree = MODULES[module]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, _resolve(module, path, node), [alias.name for alias in node.names]))
    return out


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_layout_has_the_documented_subpackages():
    assert {_subpackage(m) for m in MODULES} - {None} == set(LAYERS)
    assert {m for m in MODULES if _subpackage(m) is None} == {"ulysses_sp"}, "no module outside the subpackages"


@pytest.mark.parametrize("module", [m for m in MODULES if _subpackage(m) is not None])
def test_dependencies_point_one_way(module):
    own = _subpackage(module)
    for line, target, names in _imports(module):
        if not target.startswith("ulysses_sp"):
            continue
        targets = [target] if target != "ulysses_sp" else [f"ulysses_sp.{n}" for n in names]
        for imported in targets:
            other = _subpackage(imported)
            assert other is not None, f"{module}:{line} imports the top-level package (public API only)"
            if other == own:
                continue
            assert LAYERS[other] < LAYERS[own], (
                f"{module}:{line} imports {imported}: {own} (layer {LAYERS[own]}) may import only lower layers, "
                f"{other} is layer {LAYERS[other]} (docs/architecture.md)"
            )


@pytest.mark.parametrize("module", list(MODULES))
def test_only_comm_talks_to_torch_distributed(module):
    if module == COMM:
        return
    for line, target, _ in _imports(module):
        assert not target.startswith("torch.distributed") or target.startswith("torch.distributed.elastic"), (
            f"{module}:{line} imports {target}; every call into torch.distributed goes through {COMM}"
        )
    _, tree = MODULES[module]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and ast.unparse(node.value) == "torch":
            raise AssertionError(f"{module}:{node.lineno} uses torch.distributed; go through {COMM}")


@pytest.mark.parametrize("module", list(MODULES))
def test_no_module_reads_another_modules_private_names(module):
    path, tree = MODULES[module]
    bound = {}  # local name -> the ulysses_sp module it is bound to
    for line, target, names in _imports(module):
        if not target.startswith("ulysses_sp") or target == module:
            continue
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{module}:{line} imports private {private} from {target}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            raise AssertionError(f"{module}:{node.lineno} reads {bound[node.value.id]}.{node.attr}, a private name")
        if isinstance(node, ast.Attribute) and node.attr == "_ulysses_sp" and module != "ulysses_sp.core.apply":
            raise AssertionError(
                f"{module}:{node.lineno} reads a model's _ulysses_sp state; use "
                "ulysses_sp.core.apply.applied_topology / is_applied"
            )


@pytest.mark.parametrize("module", list(MODULES))
def test_modules_log_instead_of_printing(module):
    _, tree = MODULES[module]
    assert ast.get_docstring(tree), f"{module} has no docstring saying what it is for"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            raise AssertionError(f"{module}:{node.lineno} prints; use ulysses_sp.core.log.logger")
