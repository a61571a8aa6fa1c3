"""The layers import downwards only: cli -> flows -> tasks -> tracking -> picorl; picorl alone runs
anywhere, MLflow lives in tracking/ and Prefect above it."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["cli", "flows", "tasks", "tracking", "picorl"]  # each may import only those after it


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def top_level_imports(path: Path) -> set[str]:
    """Top-level packages a file imports, wherever the import statement sits."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def project_imports(path: Path) -> set[str]:
    return top_level_imports(path) & set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    files = [ROOT / "cli.py", *[p for d in LAYERS[1:] for p in (ROOT / d).rglob("*.py")]]
    upward = []
    for f in files:
        mine = LAYERS.index(layer_of(f))
        upward += [f"{f.relative_to(ROOT)} imports {name}" for name in project_imports(f)
                   if LAYERS.index(name) < mine]
    assert upward == []


def test_library_imports_neither_prefect_nor_mlflow():
    code = ("import importlib, pkgutil, sys, picorl, picorl.envs, picorl.rollout\n"
            "for m in pkgutil.walk_packages(picorl.__path__, 'picorl.'):\n"
            "    if m.name != 'picorl.rollout.vllm': importlib.import_module(m.name)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('prefect', 'mlflow')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_mlflow_is_imported_in_tracking_only_and_prefect_above_it():
    """tasks/ holds Prefect tasks and nothing that talks to MLflow itself; tracking/ never needs prefect."""
    mlflow_users = {f.relative_to(ROOT).as_posix() for d in ("flows", "tasks", "picorl")
                    for f in (ROOT / d).rglob("*.py") if "mlflow" in top_level_imports(f)}
    prefect_users = {f.relative_to(ROOT).as_posix() for f in (ROOT / "tracking").rglob("*.py")
                     if "prefect" in top_level_imports(f)}
    assert (mlflow_users, prefect_users) == (set(), set())
