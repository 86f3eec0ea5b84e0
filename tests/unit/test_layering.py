"""The layering of the package: the typed config (model) and the policy sit below the YAML
reading (config), so neither imports it (issue 10 item 6: the circle config <-> policy is gone
and must stay gone); the modules of the decision path stay under 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "milter"
BELOW_CONFIG = [PKG / "model.py", *sorted((PKG / "policy").rglob("*.py"))]


def _module(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["sms_milter", *parts])


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute, at any depth (lazy imports inside functions too)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


def test_model_and_policy_never_import_config():
    offenders = {_module(p): sorted(i for i in _imports(p) if i == "sms_milter.config"
                                    or i.startswith("sms_milter.config."))
                 for p in BELOW_CONFIG}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_static_check_sees_a_relative_import_of_config():
    # the check above must not be blind: these spellings all name sms_milter.config
    for src, where in (("from ..config import load", "policy/x.py"), ("from .. import config", "policy/x.py"),
                       ("from .config import parse", "model.py"),
                       ("import sms_milter.config.reader", "policy/styles/x.py")):
        path = PKG / where
        tree_imports = set()
        mod = _module(path)
        package = mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level else []
                name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                tree_imports.add(name)
                tree_imports.update(f"{name}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                tree_imports.update(a.name for a in node.names)
        assert any(i == "sms_milter.config" or i.startswith("sms_milter.config.") for i in tree_imports), src


def test_importing_model_and_every_policy_module_loads_no_config():
    mods = [_module(p) for p in BELOW_CONFIG]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}:\n"
            "    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('sms_milter.config')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_decision_path_modules_stay_under_400_lines():
    paths = [PKG / "gateway.py", PKG / "message.py", PKG / "limiting.py",
             *sorted((PKG / "policy").rglob("*.py"))]
    long = {p.relative_to(ROOT).as_posix(): n for p in paths if (n := len(p.read_text().splitlines())) >= 400}
    assert not long, long
