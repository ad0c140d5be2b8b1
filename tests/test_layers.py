"""The layers of the package, checked from the source: no module imports upward.

From the bottom up (docs/architecture.md, "Layers"):

1. ``msi_prefect.errors``, ``msi_prefect.metadata`` and ``msi_prefect.examples``: plain
   Python, no Prefect;
2. ``msi_prefect.transfer``, the transfer core: only itself and ``msi_prefect.errors``,
   no Prefect;
3. ``msi_prefect.prefect_layer``: the core (through its facade, ``msi_prefect.transfer``),
   the layer-1 modules and Prefect;
4. ``msi_prefect.warm_start`` (the worker's warm flow-run processes) and
   ``msi_prefect.stack`` (the embedded servers): everything below, not the CLI;
5. ``msi_prefect.cli``: anything.

The thin folders ``flows/`` and ``blocks/`` sit beside the CLI and import neither it nor
each other. Every ``import`` counts, also one inside a function or under
``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "msi_prefect"

BASE = ("msi_prefect.errors",)
PLAIN = (*BASE, "msi_prefect.metadata", "msi_prefect.examples")
CORE = "msi_prefect.transfer"
PREFECT_LAYER = "msi_prefect.prefect_layer"


@dataclass(frozen=True)
class Rule:
    """What the modules under ``owner`` may import from this project, and whether Prefect."""

    owner: str
    allowed: tuple[str, ...]
    prefect: bool
    core_through_facade: bool = True


# The most specific owner wins.
RULES = (
    Rule("msi_prefect", allowed=(), prefect=False),
    Rule("msi_prefect.errors", allowed=(), prefect=False),
    Rule("msi_prefect.metadata", allowed=("msi_prefect.metadata", *BASE), prefect=False),
    Rule("msi_prefect.examples", allowed=BASE, prefect=False),
    Rule(CORE, allowed=(CORE, *BASE), prefect=False, core_through_facade=False),
    Rule(PREFECT_LAYER, allowed=(PREFECT_LAYER, CORE, *PLAIN), prefect=True),
    Rule("msi_prefect.warm_start", allowed=("msi_prefect.warm_start", *BASE), prefect=True),
    Rule(
        "msi_prefect.stack",
        allowed=("msi_prefect.stack", "msi_prefect.warm_start", PREFECT_LAYER, CORE, *PLAIN),
        prefect=True,
    ),
    Rule("msi_prefect.cli", allowed=(PACKAGE,), prefect=True),
    Rule("flows", allowed=(PREFECT_LAYER, CORE, *PLAIN), prefect=True),
    Rule(
        "blocks",
        allowed=("msi_prefect.stack", PREFECT_LAYER, CORE, *PLAIN),
        prefect=True,
    ),
)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_for(module: str) -> Rule:
    """The rule of the most specific layer that holds ``module``."""
    owners = [rule for rule in RULES if _within(module, rule.owner)]
    return max(owners, key=lambda rule: len(rule.owner))


def module_name(path: Path) -> str:
    """``msi_prefect/transfer/wire.py`` -> ``msi_prefect.transfer.wire``."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> Iterator[Path]:
    """Every module of the package and of the thin deployable folders."""
    for folder in (PACKAGE, "flows", "blocks"):
        yield from sorted((REPO / folder).rglob("*.py"))


def _is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of this repository."""
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The module each ``import`` in ``tree`` loads.

    ``from a import b`` loads ``a.b`` when that is a module of the repository, else ``a``.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield submodule if _is_module(submodule) else target


def _is_project(name: str) -> bool:
    return any(_within(name, top) for top in (PACKAGE, "flows", "blocks"))


def violations_of(path: Path, source: str | None = None) -> list[str]:
    """The imports of one file (or of ``source`` as that file) that break its layer's rule."""
    module = module_name(path)
    rule = rule_for(module)
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    found = []
    for target in sorted(set(imported_modules(tree, module, path.name == "__init__.py"))):
        if _within(target, "prefect") and not rule.prefect:
            found.append(f"{module} imports {target} (no Prefect in {rule.owner})")
        elif _is_project(target) and not any(_within(target, ok) for ok in rule.allowed):
            found.append(f"{module} imports {target} ({rule.owner} may not)")
        elif rule.core_through_facade and _within(target, CORE) and target != CORE:
            found.append(f"{module} imports {target} (use the facade {CORE})")
    return found


def test_every_module_has_a_layer() -> None:
    names = [module_name(path) for path in source_files()]
    assert names
    assert all(rule_for(name) for name in names)


@pytest.mark.parametrize("path", list(source_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_an_upper_layer(path: Path) -> None:
    assert violations_of(path) == []


def test_the_check_sees_upward_imports_and_facade_bypasses() -> None:
    core_module = REPO / "msi_prefect" / "transfer" / "wire.py"
    bad_core = "from msi_prefect.cli.transfer import REGISTRY_FILE\nimport prefect\n"
    assert len(violations_of(core_module, bad_core)) == 2
    prefect_module = REPO / "msi_prefect" / "prefect_layer" / "events.py"
    assert violations_of(prefect_module, "from msi_prefect.stack import config\n")
    assert violations_of(prefect_module, "from msi_prefect.transfer.wire import MIB\n")
    assert violations_of(prefect_module, "from msi_prefect.transfer import MIB\n") == []


def test_the_facade_holds_every_name_the_other_layers_import() -> None:
    # The facade loads its names lazily, so a name missing from it fails only when the
    # import runs (type checkers see every name of a module with __getattr__ as Any).
    import msi_prefect.transfer as facade

    wanted = set()
    for path in source_files():
        if _within(module_name(path), CORE):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == CORE:
                wanted.update(alias.name for alias in node.names)
    assert wanted <= set(facade.__all__), sorted(wanted - set(facade.__all__))
    for name in facade.__all__:
        assert getattr(facade, name) is not None, name
