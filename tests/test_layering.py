"""The import rules of docs/ARCHITECTURE.md, checked on the source: methods know nothing of the
pipeline, the pipeline knows nothing of Tune or the cluster tooling (the CLI, which dispatches to
all of them, excepted), and no import hides inside a function to dodge a cycle (the CLI's lazy
imports keep `selfsup --help` fast and are its own)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("methods", "pipelines", "tune", "cluster")
# package -> first-party packages it may not import
FORBIDDEN = {"methods": {"pipelines", "tune", "cluster"}, "pipelines": {"tune", "cluster"}}
LAZY_IMPORTS_ALLOWED = {os.path.join("pipelines", "cli.py")}


def first_party_imports(path: str) -> list[tuple[str, bool]]:
    """(imported first-party module, inside a function?) for every import in the file."""
    tree = ast.parse(open(path).read(), path)
    local = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(function) if isinstance(node, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                 else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        found += [(name, id(node) in local) for name in names if name.split(".")[0] in PACKAGES]
    return found


def modules() -> list[str]:
    return sorted(os.path.join(package, name) for package in PACKAGES
                  for name in os.listdir(os.path.join(ROOT, package)) if name.endswith(".py"))


@pytest.mark.parametrize("module", modules())
def test_imports_follow_the_layering(module):
    package = module.split(os.sep)[0]
    for imported, inside_function in first_party_imports(os.path.join(ROOT, module)):
        exempt = module in LAZY_IMPORTS_ALLOWED
        assert exempt or imported.split(".")[0] not in FORBIDDEN.get(package, set()), f"{module} imports {imported}"
        assert exempt or not inside_function, f"{module} imports {imported} inside a function"


def test_the_checker_sees_a_forbidden_and_a_hidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom pipelines.config import RunConfig\n\ndef f():\n    from methods import get_method\n")
    assert first_party_imports(str(bad)) == [("pipelines.config", False), ("methods", True)]
