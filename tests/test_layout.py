"""The package's shape: verbs import the shared layer below them, never each other.

kdship/<verb>/ packages (cache, student, train, export, serve, profile, eval) may import kdship's shared modules
(store, data, render, fingerprint, heldout, run_manifest, answers, runtime/, ...) and their own
package; the demo is the one orchestrator above them all. The shared layer imports no verb.
"""

from __future__ import annotations

import ast
from pathlib import Path

KDSHIP = Path(__file__).resolve().parents[1] / "kdship"
VERBS = ("cache", "student", "train", "export", "serve", "profile", "eval")
ABOVE = ("demo",)  # the orchestrator: calls the verbs' public functions


def _kdship_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "kdship" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def _package_of(path: Path) -> str:
    rel = path.relative_to(KDSHIP).parts
    return rel[0] if len(rel) > 1 else "(shared)"


def test_no_verb_package_imports_another_and_the_shared_layer_imports_no_verb():
    bad = []
    for f in sorted(KDSHIP.rglob("*.py")):
        pkg = _package_of(f)
        if pkg in ABOVE or f.name in ("cli.py", "__main__.py") and pkg == "(shared)":
            continue  # the demo orchestrates; the top-level CLI registry names every verb
        for line, target in _kdship_imports(f):
            if target in VERBS + ABOVE and target != pkg:
                bad.append(f"{f.relative_to(KDSHIP.parent)}:{line} imports kdship.{target}")
    assert not bad, "verb packages must not import each other (move the shared part below them):\n" + "\n".join(bad)


def test_the_layout_check_sees_imports():
    """The check itself finds a cross-verb import (so an empty result above means something)."""
    src = KDSHIP / "export" / "verify.py"
    assert ("runtime" in {t for _, t in _kdship_imports(src)}) and _package_of(src) == "export"


def test_the_cli_and_training_need_no_serving_packages():
    """`kdship train`/`cache --help` with fastapi, uvicorn and vLLM unimportable (a GPU training image has
    none of them): the CLI must not pull a verb's optional packages in at import. The first CUDA run
    failed exactly so (kdship.serve's CLI read a default from a module importing fastapi)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('fastapi', 'uvicorn', 'starlette', 'vllm'): sys.modules[m] = None\n"
        "from typer.testing import CliRunner\n"
        "from kdship.cli import app\n"
        "for verb in ('train', 'cache', 'export', 'serve', 'eval'):\n"
        "    r = CliRunner().invoke(app, [verb, '--help'])\n"
        "    assert r.exit_code == 0, (verb, r.output, r.exception)\n"
        "import kdship.train.trainer\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
