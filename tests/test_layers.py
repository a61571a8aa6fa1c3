"""The layers import downwards only: cli -> flows -> tasks -> picorl, and picorl alone runs anywhere."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["cli", "flows", "tasks", "picorl"]  # each may import only those after it


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def project_imports(path: Path) -> set[str]:
    """Top-level project packages a file imports, wherever the import statement sits."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


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
