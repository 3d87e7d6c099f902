"""The layout rules of ../shared/ARCHITECTURE.md, checked on the source so they cannot drift.

Static checks read every module's syntax tree (no imports executed); the last test imports the
inference runner in a clean interpreter and lists what it loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LIB = ROOT / "lib"
CLIS = ("build_lmdb", "train_unet", "train_fcn", "inference", "fuse_masks")
MAX_LINES = 700
# Modules allowed above MAX_LINES, each one cohesive algorithm (issue 12: "unless it is one
# cohesive algorithm"). Keep this list short and say why.
LONG_MODULES = {
    # the shared-memory ring: worker processes, slot protocol, consumer and starvation monitor
    # are one protocol, read together (760 lines, about a third docstrings and comments)
    "lib.reader.imagereader": "one protocol",
}
MAX_PARAMETERS = 7
# Public constructors of config objects and model builders may take more (issue 12); config
# dataclasses have no hand-written __init__. Every other exception is named here with its reason.
MANY_PARAMETERS_ALLOWED = {
    # the reader's public constructor: keyword-only options that become its ReaderSpec (18; a
    # ReaderOptions object would be the next step)
    "lib.reader.imagereader.ImageReader.__init__",
}


def _modules() -> list[Path]:
    return sorted(p for p in LIB.rglob("*.py"))


def _name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module imported, line, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    package = _name(path).split(".") if path.name == "__init__.py" else _name(path).split(".")[:-1]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # "if TYPE_CHECKING:" imports are for annotations only: module level
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level |= {id(child) for child in node.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                # "from . import models" imports the sub-module lib.models
                names = [f"{module}.{a.name}" for a in node.names] if not node.module else [module]
            else:
                names = [node.module]
            found += [(name, node.lineno, id(node) in top_level) for name in names]
    return found


def _violations(rule) -> list[str]:
    problems = []
    for path in _modules():
        for module, line, top in _imports(path):
            message = rule(_name(path), module, top)
            if message:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {message}")
    return problems


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


RULES = {
    "common imports no other lib package": lambda me, m, top: (
        f"imports {m}" if _in(me, "lib.common") and _in(m, "lib") and not _in(m, "lib.common") else None),
    "inference never imports training": lambda me, m, top: (
        f"imports {m}" if _in(me, "lib.inference") and _in(m, "lib.training") else None),
    "store never imports the reader": lambda me, m, top: (
        f"imports {m}" if _in(me, "lib.store") and _in(m, "lib.reader") else None),
    "the reader imports TensorFlow only inside the tf.data adapter": lambda me, m, top: (
        f"imports {m} at module level" if _in(me, "lib.reader") and top and m.split(".")[0] in ("tensorflow", "keras")
        else None),
    "fusion never imports TensorFlow": lambda me, m, top: (
        f"imports {m}" if _in(me, "lib.fusion") and m.split(".")[0] in ("tensorflow", "keras") else None),
    "lib never imports a CLI": lambda me, m, top: (f"imports {m}" if m.split(".")[0] in CLIS else None),
    "argparse only in lib/common/cli.py": lambda me, m, top: (
        "imports argparse" if m == "argparse" and me != "lib.common.cli" else None),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_import_rules(rule):
    assert _violations(RULES[rule]) == [], rule


def test_lib_imports_are_relative():
    problems = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module and _in(node.module, "lib"):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import ...")
            if isinstance(node, ast.Import) and any(_in(a.name, "lib") for a in node.names):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: import lib...")
    assert problems == []


def test_function_local_imports_of_lib_modules_are_gone():
    """Module-level imports show a module's dependencies; local ones only defer heavy libraries."""
    problems = []
    for path in _modules():
        for module, line, top in _imports(path):
            if _in(module, "lib") and not top and not _in(module, "lib.models"):
                problems.append(f"{path.relative_to(ROOT)}:{line}: local import of {module}")
    assert problems == []


def test_module_sizes():
    long = {_name(p): len(p.read_text().splitlines()) for p in _modules()}
    long = {k: v for k, v in long.items() if v > MAX_LINES and k not in LONG_MODULES}
    assert long == {}


def _functions(tree: ast.AST, prefix: str):
    """(qualified name, node) of every function, methods named ``Class.method``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}.{node.name}", node
            yield from _functions(node, f"{prefix}.{node.name}")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}.{node.name}")
        else:
            yield from _functions(node, prefix)


def test_no_function_takes_more_than_seven_parameters():
    problems = []
    for path in _modules():
        for name, node in _functions(ast.parse(path.read_text()), _name(path)):
            if name in MANY_PARAMETERS_ALLOWED:
                continue
            if _in(_name(path), "lib.models") and node.name.startswith("build_"):
                continue  # model builders (issue 12)
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
            if len(names) > MAX_PARAMETERS:
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name} takes {len(names)}")
    assert problems == []


def test_the_inference_runner_loads_nothing_from_training():
    code = ("import sys, lib.inference.runner\n"
            "print(sorted(m for m in sys.modules if m.startswith(('lib.training', 'tensorflow', 'keras'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
