"""The house rules of the layout (docs/layout.md), checked without training anything.

* few modules directly under ``irnet/``; ``__all__`` only in package ``__init__`` files;
* no module imports another package's private (underscore) module or name;
* import-linter's contracts in pyproject.toml (the layering, no import circles) are kept;
* every class path named in the configs, the docs and the README resolves;
* the old module paths still import (with a ``DeprecationWarning``) and give the same objects;
* the declared interfaces: abstract bases, concrete solvers, network protocols, ``find_blocks``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import irnet.linear
import irnet.solvers
from irnet import ImplicitResidualBlock
from irnet.linear import GMRES, Direct, JacobianFree, LinearSolver, Neumann, Phantom
from irnet.module import ImplicitNetModule
from irnet.nets import (
    ConvODENet,
    ImplicitNetwork,
    ImplicitODENet,
    ODENet,
    StagedConvODENet,
    TrajectoryNetwork,
    find_blocks,
)
from irnet.solvers import IterativeSolver, NonlinearSolver

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"

#: where each package's files live: ``irnet.callbacks`` and ``irnet.datamodules`` are top-level
#: folders mapped into the package by pyproject.toml's ``package-dir``
TREES = {"irnet": "irnet", "irnet.callbacks": "callbacks", "irnet.datamodules": "datamodules"}

MAX_TOP_LEVEL_MODULES = 14


# -- reading the source tree -----------------------------------------------------------------------


def source_modules(root: Path) -> tuple[dict[str, Path], set[str]]:
    """Each module of :data:`TREES` under ``root`` by dotted name, and the names of the packages."""
    modules: dict[str, Path] = {}
    packages: set[str] = set()
    for package, folder in TREES.items():
        for path in sorted((root / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = (package, *path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
                packages.add(".".join(parts))
            modules[".".join(parts)] = path
    return modules, packages


def imported_names(module: str, path: Path, is_package: bool) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of everything ``module`` imports, anywhere in it (functions too).

    ``import a.b`` gives ``a.b``; ``from a import b`` gives ``a.b`` (a submodule or a name of
    ``a``); relative imports are resolved against the module's package.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top")
                base = parts[: len(parts) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found += [(node.lineno, f"{source}.{a.name}") for a in node.names if a.name != "*"]
    return found


def is_private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def private_owner(name: str, modules: dict[str, Path], packages: set[str]) -> str | None:
    """The package that owns ``name``'s first private part, or None if nothing in it is private.

    A private module ``P._x`` (or a private name of package ``P``) is owned by ``P``; a private
    name of a module ``P.m`` is owned by ``P`` too.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if is_private(part):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix not in packages:
                return prefix.rpartition(".")[0]
            return prefix
    return None


def private_import_violations(root: Path) -> list[str]:
    """Imports, by modules under ``root``, of irnet's private things owned by another package."""
    modules, packages = source_modules(root)
    violations = []
    for module, path in modules.items():
        for line, name in imported_names(module, path, module in packages):
            if name.split(".")[0] != "irnet":
                continue  # torch's and Lightning's internals are not the layout's business
            owner = private_owner(name, modules, packages)
            if owner is not None and not (module == owner or module.startswith(owner + ".")):
                violations.append(f"{path.relative_to(root)}:{line}: {module} imports {name}")
    return violations


# -- modules and __all__ ---------------------------------------------------------------------------


def test_few_modules_directly_under_irnet():
    top = sorted(p.name for p in (ROOT / "irnet").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, (
        f"{len(top)} modules directly under irnet/ (at most {MAX_TOP_LEVEL_MODULES}): {top}; "
        "put new ones in a package"
    )


def test_all_is_declared_only_in_package_init_files():
    modules, packages = source_modules(ROOT)
    offenders = [
        str(path.relative_to(ROOT))
        for name, path in modules.items()
        if name not in packages
        and any(
            isinstance(node, ast.Name) and node.id == "__all__"
            for node in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert not offenders, f"__all__ outside a package's __init__.py: {offenders}"
    assert {"irnet", "irnet.callbacks", "irnet.datamodules"} <= packages


# -- private modules and names ---------------------------------------------------------------------


def test_no_module_imports_another_packages_private_module_or_name():
    assert not private_import_violations(ROOT), "\n".join(private_import_violations(ROOT))


def test_the_private_import_check_finds_each_kind_of_reach(tmp_path):
    """The check on a made-up tree: what it must flag, and what it must let through."""
    files = {
        "irnet/__init__.py": "from irnet import _core\n",
        "irnet/_core.py": "",
        "irnet/a/__init__.py": "from irnet.a._hidden import thing\n_SECRET = 1\n",
        "irnet/a/_hidden.py": "thing = 1\n",
        "irnet/a/public.py": "from . import _hidden\nfrom .public2 import _name\n",
        "irnet/a/public2.py": "_name = 1\n",
        "irnet/b/__init__.py": "",
        "irnet/b/user.py": (
            "import torch._C\n"  # not irnet's
            "from irnet._core import x\n"  # irnet's own private module: every irnet module is in
            "import irnet.a._hidden\n"  # flagged
            "from irnet.a import _SECRET\n"  # flagged: a private name of package irnet.a
            "def f():\n"
            "    from ..a.public2 import _name\n"  # flagged, relative and inside a function
            "    from irnet.a.public2 import name\n"
        ),
        "callbacks/__init__.py": "from irnet.a import _hidden\n",  # flagged: irnet.callbacks
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(private_import_violations(tmp_path)) == [
        "callbacks/__init__.py:1: irnet.callbacks imports irnet.a._hidden",
        "irnet/b/user.py:3: irnet.b.user imports irnet.a._hidden",
        "irnet/b/user.py:4: irnet.b.user imports irnet.a._SECRET",
        "irnet/b/user.py:6: irnet.b.user imports irnet.a.public2._name",
    ]


# -- import-linter's contracts ---------------------------------------------------------------------


def contract_names() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with PYPROJECT.open("rb") as f:
        return [c["name"] for c in tomllib.load(f)["tool"]["importlinter"]["contracts"]]


def lint_imports(copy: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's contracts, on the package copied into ``copy``."""
    executable = Path(sys.executable).with_name("lint-imports")
    if not executable.exists():
        pytest.skip("lint-imports is not installed (pip install import-linter)")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    return subprocess.run(
        [str(executable), "--no-cache", "--no-logo", str(PYPROJECT)],
        cwd=copy,  # not the repository root, whose own irnet/ would be imported
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture()
def package_copy(tmp_path: Path) -> Path:
    """irnet as installed: ``irnet/`` with ``callbacks/`` and ``datamodules/`` inside it.

    import-linter (grimp) reads only the files under a package's own folder, so the two
    top-level folders that pyproject.toml maps into irnet are put where it can see them.
    """
    ignore = shutil.ignore_patterns("__pycache__")
    for package, folder in TREES.items():
        shutil.copytree(ROOT / folder, tmp_path.joinpath(*package.split(".")), ignore=ignore)
    return tmp_path


def test_import_linter_contracts_are_kept(package_copy: Path):
    result = lint_imports(package_copy)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    names = contract_names()
    assert len(names) == 2, names
    for name in names:
        assert f"{name} KEPT" in out, out
    assert f"Contracts: {len(names)} kept, 0 broken." in out, out


def test_import_linter_finds_an_import_that_breaks_the_layering(package_copy: Path):
    layer = package_copy / "irnet" / "layer.py"
    layer.write_text(layer.read_text() + "\nimport irnet.cli\n")
    result = lint_imports(package_copy)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    layers = contract_names()[0]
    assert f"{layers} BROKEN" in out, out
    assert "irnet.layer is not allowed to import irnet.cli" in out, out


# -- class paths in configs and docs ---------------------------------------------------------------

#: ``class_path: a.b.C`` or ``...class_path a.b.C``; not a placeholder (``irnet.solvers.<Name>``)
CLASS_PATH = re.compile(r"class_path:?\s+[\"']?([A-Za-z_]\w*(?:\.\w+)+)(?!\w|\.[\w<])")


def named_class_paths() -> list[tuple[str, str]]:
    """``(file, class path)`` for every class path the configs, docs and README name."""
    files = sorted(ROOT.glob("configs/*.yaml")) + sorted(ROOT.glob("docs/**/*.md"))
    found = []
    for path in [*files, ROOT / "README.md"]:
        for name in CLASS_PATH.findall(path.read_text()):
            found.append((str(path.relative_to(ROOT)), name))
    return found


def resolve(path: str) -> object:
    """The object a dotted class path names: the longest importable module, then attributes."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


@pytest.fixture()
def doc_modules(tmp_path, monkeypatch):
    """The docs' example modules (a ``python`` block opening with ``\"\"\"name.py: ...``),
    importable as the docs tell the reader to save them."""
    names = []
    for doc in sorted(ROOT.glob("docs/**/*.md")):
        for code in re.findall(r"```python\n(.*?)```", doc.read_text(), re.S):
            match = re.match(r'"""(\w+)\.py\b', code)
            if match:
                (tmp_path / f"{match.group(1)}.py").write_text(code)
                names.append(match.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield names
    for name in names:
        sys.modules.pop(name, None)


def test_every_class_path_in_the_configs_and_docs_resolves(doc_modules):
    named = named_class_paths()
    files = {file for file, _ in named}
    assert {"configs/ex1_sine.yaml", "configs/digits.yaml", "README.md"} <= files, files
    broken = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # old module paths resolve too
        for file, name in named:
            try:
                obj = resolve(name)
            except (ImportError, AttributeError) as error:
                broken.append(f"{file}: {name} ({type(error).__name__}: {error})")
                continue
            if not inspect.isclass(obj):
                broken.append(f"{file}: {name} is not a class")
    assert not broken, "\n".join(broken)


def test_a_misspelled_class_path_does_not_resolve():
    with pytest.raises(AttributeError):
        resolve("irnet.nets.ODENetz")
    with pytest.raises(ImportError):
        resolve("irnet_missing.nets.ODENet")


# -- old module paths ------------------------------------------------------------------------------


@pytest.fixture()
def old_paths_unimported(monkeypatch):
    """No old module path imported yet (so each import warns), and none left imported after."""
    from irnet._moved import MOVED

    def forget() -> None:
        for old in MOVED:
            sys.modules.pop(old, None)
            parent, _, child = old.rpartition(".")
            if child in vars(sys.modules[parent]):
                delattr(sys.modules[parent], child)

    for old in MOVED:  # put back afterwards what an earlier test imported
        monkeypatch.delitem(sys.modules, old, raising=False)
        parent, _, child = old.rpartition(".")
        monkeypatch.delattr(importlib.import_module(parent), child, raising=False)
    yield MOVED
    forget()


@pytest.mark.parametrize(
    "old, name, new",
    [
        ("irnet.staged_net", "StagedConvODENet", "irnet.nets.staged"),
        ("irnet.attacks", "pgd", "irnet.analysis.attacks"),
        ("irnet.contraction", "matrix_norm", "irnet.nets.contraction"),
        ("irnet.stability", "spectral_radius_curve", "irnet.analysis.stability"),
        ("irnet.warm_start", "WarmStartCache", "irnet.nets.warm_start"),
        ("irnet.linear.neumann_rows", "Neumann", "irnet.linear.neumann"),
    ],
)
def test_an_old_module_path_imports_with_a_warning_naming_the_new_one(
    old, name, new, old_paths_unimported
):
    with pytest.warns(DeprecationWarning, match=re.escape(f"has moved to {new}")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_every_old_module_path_imports(old_paths_unimported):
    for old, new in old_paths_unimported.items():
        with pytest.warns(DeprecationWarning, match=re.escape(new)):
            module = importlib.import_module(old)
        public = [k for k in vars(importlib.import_module(new)) if not k.startswith("__")]
        assert public, new
        for attr in public:
            assert getattr(module, attr) is getattr(importlib.import_module(new), attr), (old, attr)


def test_an_unknown_old_path_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("irnet.no_such_module")


# -- declared interfaces ---------------------------------------------------------------------------


def test_the_solver_bases_are_abstract():
    for base in (NonlinearSolver, IterativeSolver, LinearSolver, ImplicitODENet):
        assert inspect.isabstract(base), base
        bare = type("Bare", (base,), {})
        with pytest.raises(TypeError, match="abstract"):
            bare()


def test_a_subclass_with_the_abstract_methods_is_concrete():
    """What :func:`test_the_solver_bases_are_abstract` refuses is missing methods, not the bases."""

    def nothing(self, *args):
        raise NotImplementedError

    solver = type("Solver", (NonlinearSolver,), {"solve": nothing})
    iterative = type("Iterative", (IterativeSolver,), {"init": nothing, "step": nothing})
    linear = type("Linear", (LinearSolver,), {"solve": nothing})
    net = type("Net", (ImplicitODENet,), {"lift": nothing, "readout": nothing})
    for cls in (solver, iterative, linear, net):
        assert not inspect.isabstract(cls), cls
        cls()
    with pytest.raises(TypeError, match="abstract"):
        type("HalfIterative", (IterativeSolver,), {"init": nothing})()


def shipped(package, base) -> list[type]:
    return [
        cls
        for cls in (getattr(package, name) for name in package.__all__)
        if inspect.isclass(cls) and issubclass(cls, base)
    ]


def test_every_shipped_solver_is_concrete():
    nonlinear = shipped(irnet.solvers, NonlinearSolver)
    linear = shipped(irnet.linear, LinearSolver)
    names = {cls.__name__ for cls in nonlinear + linear}
    assert {"FixedPoint", "Anderson", "Broyden", "Fallback", "Direct", "GMRES", "Phantom"} <= names
    for cls in nonlinear + linear:
        if cls in (NonlinearSolver, IterativeSolver, LinearSolver):
            continue
        assert not inspect.isabstract(cls), f"{cls.__name__} is abstract"


def test_linear_solvers_declare_whether_they_approximate():
    for cls in (Direct, GMRES, Neumann):
        assert cls.approximate is False, cls
        assert cls().approximate is False, cls
    for cls in (JacobianFree, Phantom):
        assert cls.approximate is True, cls
        assert cls().approximate is True, cls


def test_the_networks_declare_their_protocols():
    ode = ODENet(in_features=2, out_features=2, layers=2, width=4)
    conv = ConvODENet(image_size=8, channels=2, hidden_channels=4, layers=2)
    staged = StagedConvODENet(channels=2, steps=1)
    for net in (ode, conv):
        assert isinstance(net, TrajectoryNetwork), type(net)
        assert isinstance(net, ImplicitNetwork), type(net)
    assert isinstance(staged, ImplicitNetwork)
    assert not isinstance(staged, TrajectoryNetwork)
    assert not isinstance(nn.Linear(2, 2), ImplicitNetwork)


def test_find_blocks_in_a_net_a_lightning_module_and_a_plain_module():
    net = ODENet(in_features=1, out_features=1, layers=3, width=4)
    assert [id(b) for b in find_blocks(net)] == [id(b) for b in net.blocks]
    module = ImplicitNetModule(net=net)
    assert [id(b) for b in find_blocks(module)] == [id(b) for b in net.blocks]
    first = ImplicitResidualBlock(nn.Linear(3, 3), theta=0.5)
    second = ImplicitResidualBlock(nn.Linear(3, 3), theta=1.0)
    plain = nn.Sequential(first, nn.Tanh(), nn.Sequential(nn.Linear(3, 3), second))
    assert [id(b) for b in find_blocks(plain)] == [id(first), id(second)]
    assert find_blocks(nn.Linear(3, 3)) == []
    assert find_blocks(plain)[0](torch.zeros(2, 3)).shape == (2, 3)
