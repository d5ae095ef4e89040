"""The layering rules of DESIGN.md, checked on the source (AST), so a change that breaks one fails here.

* ``core/`` is pure torch + stdlib: it imports neither Lightning nor any lightning_diag module outside ``core/``.
* A callback module imports no other callback module (only private helpers: the shared ``_base``, ``_context``,
  ``_deferred``, ``_compat``, or one callback's own machinery such as ``_hang_watch``): what callbacks share
  travels through the run context.
* No ``Verdict(`` is built in a callback module except ``DiagCallback.decline``: a rule and the words of its
  finding live in the callback's core partner.
* Private torch/Lightning state (``trainer._x``, ``getattr(optimizer, "_x")``, ``nn.modules.batchnorm._NormBase``)
  is touched only in ``lightning_diag/_lightning.py``. torch's ``_foreach_*`` kernels (the functional API
  ``torch.nn.utils`` itself is built on, not state) are called only by the two foreach modules,
  ``core/grad_stats.py`` and ``core/clipping.py``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lightning_diag"
#: the two modules that call torch's ``_foreach_*`` kernels
FOREACH_MODULES = {"core/grad_stats.py", "core/clipping.py"}
#: lightning_diag's own private modules: ``_lightning.amp_scaler`` is our API, not private state
OWN_PRIVATE_MODULES = {
    "_lightning",
    "_logging",
    "_distributed",
    "_validation",
    "_containment",
    "_compat",
    "_deferred",
    "_context",
    "_base",
}


def _modules(folder: str = "") -> list[pathlib.Path]:
    root = PACKAGE / folder if folder else PACKAGE
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", _modules("core"), ids=_rel)
def test_core_imports_only_torch_stdlib_and_core(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text())
    bad = [
        name
        for name in _imports(tree)
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")
        or (name.startswith("lightning_diag") and not name.startswith("lightning_diag.core"))
    ]
    assert not bad, f"{_rel(path)} imports {bad}: core/ must stay free of Lightning and of the adapters"


@pytest.mark.parametrize("path", _modules("callbacks"), ids=_rel)
def test_a_callback_imports_no_other_callback(path: pathlib.Path) -> None:
    if path.name == "__init__.py":
        return
    tree = ast.parse(path.read_text())
    others = {
        name.split(".")[2]
        for name in _imports(tree)
        if name.startswith("lightning_diag.callbacks.") and len(name.split(".")) > 2
    }
    others = {
        m for m in others if not m.startswith("_")
    }  # private helpers (_base, _deferred, _hang_watch...)
    others -= {path.stem}
    assert not others, f"{_rel(path)} imports the callback module(s) {sorted(others)}"
    from_package = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module == "lightning_diag.callbacks"
        and any(not alias.name.startswith("_") for alias in node.names)
    ]
    assert not from_package, f"{_rel(path)} imports callbacks from lightning_diag.callbacks"


def _verdict_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, enclosing function)`` of every ``Verdict(...)`` call."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                callee = child.func
                called = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", "")
                if called == "Verdict":
                    found.append((child.lineno, function))
            visit(child, name)

    visit(tree, "<module>")
    return found


@pytest.mark.parametrize("path", _modules("callbacks"), ids=_rel)
def test_no_verdict_is_built_in_a_callback_module(path: pathlib.Path) -> None:
    calls = _verdict_calls(ast.parse(path.read_text()))
    allowed = [(line, fn) for line, fn in calls if path.name == "_base.py" and fn == "decline"]
    built = [c for c in calls if c not in allowed]
    assert not built, f"{_rel(path)} builds Verdicts at {built}: the words belong to its core partner"


def _own_private_names() -> set[str]:
    """The private names lightning_diag defines itself (methods, attributes, module-level names): touching them is
    touching our own objects.
    """
    names: set[str] = set()
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


OWN_NAMES = _own_private_names()


def _private_touches(tree: ast.AST, *, foreach_allowed: bool = False) -> list[tuple[int, str]]:
    """Private names of objects that are not ours: ``x._name`` and ``getattr``/``setattr``/``hasattr``/``delattr``
    with a private name, except lightning_diag's own private names and modules; ``torch._foreach_*`` where allowed.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name, target = node.attr, node.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            name, target = node.args[1].value, node.args[0]
        else:
            continue
        if not name.startswith("_") or name.startswith("__") or name in OWN_NAMES:
            continue
        if isinstance(target, ast.Name) and (
            target.id in ("self", "cls") or target.id in OWN_PRIVATE_MODULES
        ):
            continue
        if foreach_allowed and name.startswith("_foreach_") and ast.unparse(target) == "torch":
            continue
        found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("path", [p for p in _modules() if p.name != "_lightning.py"], ids=_rel)
def test_private_torch_and_lightning_state_only_in_lightning_module(path: pathlib.Path) -> None:
    foreach = str(path.relative_to(PACKAGE)) in FOREACH_MODULES
    touches = _private_touches(ast.parse(path.read_text()), foreach_allowed=foreach)
    assert not touches, (
        f"{_rel(path)} touches private state {touches}: go through lightning_diag/_lightning.py"
    )


def test_the_checks_can_fail() -> None:
    """Each rule flags the pattern it forbids (a checker that flags nothing proves nothing)."""
    assert _verdict_calls(ast.parse("def f():\n    return Verdict('x', 'info', 'm')")) == [(2, "f")]
    touched = (
        "torch._foreach_norm(x)\ntrainer.strategy._accelerator\ngetattr(o, '_step_supports_amp_scaling')"
    )
    assert len(_private_touches(ast.parse(touched))) == 3
    assert len(_private_touches(ast.parse(touched), foreach_allowed=True)) == 2
    assert not _private_touches(ast.parse("self._x.y\n_lightning.amp_scaler(t)\ngetattr(self, '_z', None)"))
    assert "lightning.pytorch" in _imports(ast.parse("import lightning.pytorch as pl"))
