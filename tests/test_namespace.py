"""One namespace: everything is imported as quadsel.*, and only `quadsel` is installed at the top level."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import quadsel

REPO = Path(__file__).resolve().parents[1]
BARE = {"pipeline", "influence", "selection", "jobs"}
CODE_DIRS = ["quadsel", "pipeline", "influence", "selection", "jobs", "bench", "tests"]


def _python_files():
    for d in CODE_DIRS:
        yield from sorted((REPO / d).rglob("*.py"))


def test_no_module_imports_the_old_bare_names():
    offenders = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # "module:Class" registries, imported by name at run time
                m = re.fullmatch(r"([a-z_]\w*(?:\.\w+)+):\w+", node.value)
                if m:
                    names = [m.group(1)]
            for name in names:
                if name.split(".", 1)[0] in BARE:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not offenders, "bare top-level imports (use quadsel.<package>):\n" + "\n".join(offenders)


def test_version_and_cli_version():
    assert quadsel.__version__ and quadsel.__version__ != "0+unknown"
    out = subprocess.run([sys.executable, "-m", "quadsel", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"quadsel {quadsel.__version__}"


def test_loggers_are_named_after_their_modules():
    import logging

    import quadsel.influence.scorers  # noqa: F401
    import quadsel.pipeline.cluster  # noqa: F401

    assert "quadsel.pipeline.cluster" in logging.root.manager.loggerDict
    assert "quadsel.influence.scorers" in logging.root.manager.loggerDict


def test_user_folder_named_like_a_subpackage_does_not_shadow(tmp_path):
    """A user's own pipeline/ or jobs.py beside their script must not break the README's imports."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "shards.py").write_text("raise ImportError('the user module was imported')\n")
    (tmp_path / "jobs.py").write_text("raise ImportError('the user module was imported')\n")
    code = ("from quadsel.pipeline.shards import data_files, verify\n"
            "from quadsel.jobs.cli import main\n"
            "import pipeline, sys; assert pipeline.__file__.startswith(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, check=True)


@pytest.mark.slow
def test_wheel_installs_only_the_quadsel_namespace(tmp_path):
    # built from a copy of the tracked files: a build in the checkout would leave build/ and a
    # quadsel.egg-info there, whose metadata shadows the installed one for code run from the root
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("quadsel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"quadsel"}, tops
    for sub in ("pipeline/shards/writer.py", "pipeline/sources/readers.py", "pipeline/embed/tfidf.py",
                "influence/scorers.py", "selection/bandit.py",
                "jobs/cli.py", "__init__.py", "__main__.py"):
        assert f"quadsel/{sub}" in names
    (eps,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(eps).decode()
    assert "[quadsel.embedders]" in text and "hidden = quadsel.influence.embedders:HiddenStateEmbedder" in text


# which packages each package may import (function-level imports included): a DAG, core at the bottom,
# then the pure selection package
LAYERS = {
    "core": set(),
    "selection": {"core"},
    "pipeline": {"core", "selection"},  # selection.types: how rows group into clusters
    "influence": {"core", "pipeline"},
    "jobs": {"core", "pipeline", "influence", "selection"},
}


def _imported_packages(path: Path, package: str) -> set[str]:
    """The quadsel sub-packages a module imports (``quadsel`` itself, for ``__version__``, is not one)."""
    rel = path.relative_to(REPO / ("quadsel/core" if package == "core" else package))
    here = ["quadsel", package, *rel.parts[:-1]]  # the module's package, for relative imports
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "quadsel" and len(parts) > 1 and parts[1] in LAYERS:
                out.add(parts[1])
    return out - {package}


def test_packages_are_layered_without_cycles():
    bad = []
    for package, allowed in LAYERS.items():
        root = REPO / ("quadsel/core" if package == "core" else package)
        for path in sorted(root.rglob("*.py")):
            extra = _imported_packages(path, package) - allowed
            if extra:
                bad.append(f"{path.relative_to(REPO)} imports quadsel.{', quadsel.'.join(sorted(extra))}")
    assert not bad, "\n".join(bad)


def test_every_user_error_is_a_quadsel_error_defined_in_one_place():
    """Exception types live in quadsel.core.errors (a module may refine one of them); the CLI
    answers every QuadselError with one line and exit 2, so none can be forgotten there."""
    import importlib
    import inspect
    import pkgutil

    from quadsel.core.errors import QuadselError

    found = {}
    for pkg in ("core", "pipeline", "influence", "selection", "jobs"):
        root = importlib.import_module(f"quadsel.{pkg}")
        for info in pkgutil.walk_packages(root.__path__, f"quadsel.{pkg}."):
            mod = importlib.import_module(info.name)
            for name, obj in vars(mod).items():
                # errors only: a signal's KeyboardInterrupt (cli.Stopped) is control flow
                if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == mod.__name__:
                    found[f"{mod.__name__}.{name}"] = obj
    assert "quadsel.core.errors.SourceError" in found and len(found) > 15
    outside = sorted(n for n, e in found.items() if not n.startswith("quadsel.core.errors.")
                     and not n.endswith("._StopForTest"))
    assert outside == ["quadsel.jobs.preflight.PreflightError"], outside  # a JobError listing all problems
    assert all(issubclass(e, QuadselError) for e in found.values() if e.__name__ != "_StopForTest")
