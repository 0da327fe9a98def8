"""The import rules of docs/ARCHITECTURE.md, checked on the source: methods know nothing of the
pipeline, the pipeline knows nothing of Tune or the cluster tooling (the CLI, which dispatches to
all of them, excepted), the pipeline's rooms import only the rooms below them, and no import hides
inside a function to dodge a cycle (the CLI's lazy imports keep `selfsup --help` fast and are its
own)."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("methods", "pipelines", "tune", "cluster")
# package -> first-party packages it may not import
FORBIDDEN = {"methods": {"pipelines", "tune", "cluster"}, "pipelines": {"tune", "cluster"}}
# The rooms of pipelines/, bottom first: each may import those before it, never one after it.
PIPELINE_LAYERS = ("pipelines.console", "pipelines.images", "pipelines.config", "pipelines.weights",
                   "pipelines.evaluate", "pipelines.train", "pipelines.outputs", "pipelines.curate", "pipelines.cli")
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
    return sorted(os.path.relpath(os.path.join(folder, name), ROOT) for package in PACKAGES
                  for folder, _, names in os.walk(os.path.join(ROOT, package)) for name in names
                  if name.endswith(".py"))


def layer(module: str) -> int | None:
    """The index in PIPELINE_LAYERS of a dotted module name, or None outside pipelines/."""
    return next((i for i, room in enumerate(PIPELINE_LAYERS) if module == room or module.startswith(room + ".")), None)


def dotted(path: str) -> str:
    return path[:-3].replace(os.sep, ".").removesuffix(".__init__")


@pytest.mark.parametrize("module", modules())
def test_imports_follow_the_layering(module):
    package = module.split(os.sep)[0]
    own = layer(dotted(module))
    for imported, inside_function in first_party_imports(os.path.join(ROOT, module)):
        exempt = module in LAZY_IMPORTS_ALLOWED
        assert exempt or imported.split(".")[0] not in FORBIDDEN.get(package, set()), f"{module} imports {imported}"
        assert exempt or not inside_function, f"{module} imports {imported} inside a function"
        target = layer(imported)
        if own is not None and target is not None:
            assert target <= own, f"{module} ({PIPELINE_LAYERS[own]}) imports {imported}, a room above it"


def test_every_module_of_pipelines_is_in_a_room():
    rooms = {dotted(m) for m in modules() if m.startswith("pipelines" + os.sep)} - {"pipelines"}
    assert all(layer(room) is not None for room in rooms), sorted(r for r in rooms if layer(r) is None)


def test_the_checker_sees_a_forbidden_and_a_hidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom pipelines.config import RunConfig\n\ndef f():\n    from methods import get_method\n")
    assert first_party_imports(str(bad)) == [("pipelines.config", False), ("methods", True)]


def test_the_checker_sees_a_room_importing_one_above_it():
    assert layer("pipelines.images.ingest") < layer("pipelines.train.loop")
    assert layer("pipelines.evaluate") < layer("pipelines.train") < layer("pipelines.outputs")
    assert layer("pipelines.datax") is None  # a room's name is matched whole


def test_rooms_stay_small_enough_to_read():
    """A module of pipelines/, methods/, tune/ or cluster/ holds at most 450 lines (the CLI
    excepted), and a function of pipelines/ or methods/ at most 60 unless its docstring says why
    it must be one piece."""
    too_long = []
    for module in modules():
        source = open(os.path.join(ROOT, module)).read()
        if module != os.path.join("pipelines", "cli.py") and source.count("\n") > 450:
            too_long.append(f"{module}: {source.count(chr(10))} lines")
        if module.split(os.sep)[0] not in ("pipelines", "methods"):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                if "one piece" not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{module}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, too_long


def edits_the_import_path(path: str) -> bool:
    """Whether the file calls a method of `sys.path` that changes it (insert, append, extend)."""
    for node in ast.walk(ast.parse(open(path).read(), path)):
        target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if (isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name)
                and target.value.id == "sys" and node.func.attr in ("insert", "append", "extend")):
            return True
    return False


def test_nothing_edits_the_import_path(tmp_path):
    """Scripts run with `python -m` from the checkout and tests import `tests.helpers`: no file
    of the repository changes its import path."""
    found = []
    for folder, names, files in os.walk(ROOT):
        names[:] = [n for n in names if not n.startswith(".") and n not in ("__pycache__", "venv")]
        found += [os.path.relpath(os.path.join(folder, name), ROOT) for name in files
                  if name.endswith(".py") and edits_the_import_path(os.path.join(folder, name))]
    assert not found, found
    planted = tmp_path / "script.py"
    planted.write_text("import os\nimport sys\n\nsys.path.append(os.getcwd())\n")
    assert edits_the_import_path(str(planted))


# What a run's Ray processes unpickle besides Ray Train's own: the decode tasks' functions (Train's
# controller, DatasetManager and SplitCoordinator, each decode worker) and the controller's
# `train_loop_config` (the RunPlan) and callbacks (the tracker). Each process pays for what these
# import before its first row (docs/BENCHMARKS.md, "Each run's Ray processes").
UNPICKLED_IN_RAY_PROCESSES = ("pipelines.images.decode_tasks", "pipelines.images.probe", "pipelines.train.plan",
                              "pipelines.train.tracking")
HEAVY = ("torch", "timm", "torchvision", "kornia")


def heavy_imports_of(modules: tuple[str, ...]) -> list[str]:
    """The HEAVY packages a fresh interpreter has loaded after importing `modules`."""
    probe = f"import sys\nimport {', '.join(modules)}\nprint(sorted(set(m.split('.')[0] for m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [name for name in HEAVY if f"'{name}'" in done.stdout]


def test_what_a_runs_ray_processes_unpickle_imports_no_torch_or_timm():
    assert heavy_imports_of(UNPICKLED_IN_RAY_PROCESSES) == []
    assert heavy_imports_of(("pipelines.images.ingest",)) == ["torch"]  # the check sees an import of torch
