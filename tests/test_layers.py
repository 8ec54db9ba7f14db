"""The package's layering, checked on every import statement (lazy ones inside functions too):

    cli -> engine, export, serve (and demo: the built-in model's commands); serve -> engine;
    export -> engine; engine -> kernels; kernels -> nothing of tinyv's but tinyv.errors.
"""
import ast
import os

import pytest

import tinyv

ROOT = os.path.dirname(os.path.abspath(tinyv.__file__))
SHARED = {"errors", "_version"}  # root modules every layer may use
ALLOWED = {
    "kernels": {"kernels", "errors"},
    "engine": {"engine", "kernels"} | SHARED,
    "export": {"export", "engine", "kernels"} | SHARED,
    "serve": {"serve", "engine"} | SHARED,
    "cli": {"cli", "engine", "export", "serve", "demo", ""} | SHARED,
    "demo": {"demo", "engine", "export", "kernels", "testing", ""} | SHARED,
    "testing": {"testing", "engine", "export"} | SHARED,
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every tinyv module a source file imports, wherever the import is."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tinyv":  # `from tinyv import engine` names a module below the root
                found += [(node.lineno, f"tinyv.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return [(line, m) for line, m in found if m == "tinyv" or m.startswith("tinyv.")]


def layer_of(module: str) -> str:
    """``tinyv.engine.phi`` -> ``engine``; ``tinyv`` -> ``""`` (the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(layer: str, source: str) -> list[str]:
    allowed = ALLOWED[layer]
    out = []
    for line, module in imported_modules(source):
        if layer_of(module) not in allowed:
            out.append(f"line {line}: {layer}/ imports {module}")
    return out


def package_files():
    for layer in ALLOWED:
        folder = os.path.join(ROOT, layer)
        for dirpath, _, names in os.walk(folder):
            for name in names:
                if name.endswith(".py"):
                    yield layer, os.path.join(dirpath, name)


def test_the_checker_sees_lazy_and_indirect_imports():
    src = ("def f():\n    from tinyv.export.loaders import load_model\n"
           "import importlib\nimportlib.import_module('tinyv.cli.main')\nfrom tinyv import export\n")
    assert sorted(violations("engine", src)) == ["line 2: engine/ imports tinyv.export.loaders",
                                         "line 4: engine/ imports tinyv.cli.main",
                                         "line 5: engine/ imports tinyv.export"]
    assert violations("kernels", "from tinyv.errors import TinyVError\n") == []
    assert violations("kernels", "import tinyv.engine.phi\n") == ["line 1: kernels/ imports tinyv.engine.phi"]


def test_every_layer_keeps_to_its_imports():
    files = list(package_files())
    assert len(files) > 30  # the walk found the package
    bad = []
    for layer, path in files:
        with open(path, encoding="utf-8") as f:
            bad += [f"{os.path.relpath(path, ROOT)} {v}" for v in violations(layer, f.read())]
    assert bad == []


@pytest.mark.parametrize("module", ["tinyv.engine.engine", "tinyv.kernels.native", "tinyv.serve.server"])
def test_runtime_imports_load_no_exporter(module):
    """Importing the runtime pulls in nothing of export/ or cli/ (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith(('tinyv.export', 'tinyv.cli'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
