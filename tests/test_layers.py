"""Imports flow downward: a stage never imports a later one (even lazily), and `job.cli` starts light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import job

PACKAGE = Path(job.__file__).parent
LAYERS = [
    ("job", "job.errors", "job.settings"),
    ("job.config",),
    ("job.storage.objects", "job.storage.run_folder"),
    ("job.data",),
    ("job.train",),
    ("job.evaluation",),
    ("job.storage.publish", "job.storage.artifacts"),
    ("job.after",),
    ("job.platforms",),
    ("job.pipeline",),
    ("job.cli", "job.__main__"),
]
"""Bottom to top: the run folder and object storage sit under the stages; publishing comes after evaluation."""


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} has no layer in tests/test_layers.py"
    return best[0]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if node.module == "job.storage"}
    return {name for name in found if name == "job" or name.startswith("job.")}


def test_no_module_imports_a_later_stage():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for target in _imports(path):
            if target in ("job.storage",):
                continue  # the package itself; `from job.storage import objects` is caught by its dotted name
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward


def test_the_layer_check_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from job.pipeline import run_pipeline\n")
    assert _imports(probe) == {"job.pipeline"} and _layer("job.pipeline") > _layer("job.storage.run_folder")


def test_importing_the_cli_loads_no_stage_and_no_heavy_library():
    code = (
        "import sys, job.cli\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('job', 'torch', 'transformers', 'trl', 'peft', 'datasets', 'boto3'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(loaded) == {"job", "job.cli", "job.errors"}, loaded
