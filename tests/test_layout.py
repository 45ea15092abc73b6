"""The package's shape: what the client side loads, no import cycle, modules of a readable
size, and a deploy lock that matches the declared dependencies.

The import contracts themselves (who may import whom) are in pyproject.toml, checked by
``lint-imports`` in scripts/test; these tests cover what a static contract cannot.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import costream

PACKAGE_DIR = Path(costream.__file__).parent
REPO_DIR = Path(__file__).parent.parent
MAX_MODULE_LINES = 450
HEAVY_FOR_A_CLIENT = ("litellm", "starlette", "uvicorn", "costream.server", "costream.agent")


def test_client_imports_load_no_server_side_and_no_litellm() -> None:
    """Importing the client, its publisher and costream.publisher loads none of the server side."""
    code = (
        "import json, sys\n"
        "import costream.client, costream.client.publisher, costream.publisher\n"
        f"heavy = {HEAVY_FOR_A_CLIENT!r}\n"
        "loaded = [m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)]\n"
        "print(json.dumps(sorted(loaded)))\n"
    )
    # A fresh interpreter: this test process has imported LiteLLM and Starlette already.
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == []


def test_the_package_has_no_import_cycle() -> None:
    """No costream module imports, directly or through others, a module that imports it."""
    # Imports under TYPE_CHECKING count too: a cycle for the type checker is still one for
    # the reader. No .grimp_cache in the tree.
    graph = grimp.build_graph("costream", exclude_type_checking_imports=False, cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                cycles.append(" -> ".join((importer, *back)))
    assert cycles == []


def test_only_broker_modules_import_redis() -> None:
    """redis is imported directly by costream.broker's modules alone, new modules included."""
    graph = grimp.build_graph("costream", include_external_packages=True, cache_dir=None)
    importers = graph.find_modules_that_directly_import("redis")
    assert sorted(m for m in importers if not m.startswith("costream.broker.")) == []


def test_no_module_is_longer_than_450_lines() -> None:
    """Every module stays readable in one sitting (STYLE.md: aim for 100-400, split past that)."""
    too_long = {
        str(path.relative_to(PACKAGE_DIR)): lines
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert too_long == {}


def test_the_image_lock_pins_every_runtime_dependency_within_its_range() -> None:
    """deploy/requirements.lock, what the image installs, pins each declared dependency validly."""
    declared = tomllib.loads((REPO_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    lock = (REPO_DIR / "deploy" / "requirements.lock").read_text(encoding="utf-8")
    pinned = {
        canonicalize_name(match[1]): match[2]
        for match in re.finditer(r"^([A-Za-z0-9._-]+)==([^\s;]+)", lock, re.MULTILINE)
    }
    unmet = {}
    for line in declared["project"]["dependencies"]:
        requirement = Requirement(line)
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None or version not in requirement.specifier:
            unmet[str(requirement)] = version
    # Regenerate with scripts/lock when this fails.
    assert unmet == {}


def test_the_readme_module_map_names_every_module_and_only_those() -> None:
    """README.md's module map lists each module of the package once, and no module that
    does not exist."""
    readme = (REPO_DIR / "README.md").read_text(encoding="utf-8")
    start = readme.index("| module | owns |")
    table = readme[start : readme.index("\n\n", start)]
    listed = [
        name
        for row in table.splitlines()[2:]
        for name in re.findall(r"`([a-z_/]+)`", row.split("|")[1])
        if not name.endswith("/")  # an area's heading row
    ]
    modules = sorted(
        str(path.relative_to(PACKAGE_DIR).with_suffix(""))
        for path in PACKAGE_DIR.rglob("*.py")
        if path.name != "__init__.py"
    )
    assert sorted(listed) == modules
