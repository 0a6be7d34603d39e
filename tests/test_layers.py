"""The corridors between parts, checked from the source: which part may import which, and that
work reaches a node's conductor through the one door (conductor/door.py). Fast: it reads
files, nothing else."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in sorted(_imports(path)):
            if name.startswith(forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("folder, forbidden", [
    # The boot services run on a lab's server: nothing of the simulated lab.
    ("pxe", ("labmetal.lab", "lab.")),
    # Benchmarks use the simulated lab, not the test suite's insides.
    ("bench", ("tests",)),
    # The core and the conductor know nothing of the web layer.
    ("conductor", ("labmetal.api",)),
    ("images", ("labmetal.api",)),
])
def test_a_part_imports_only_what_it_may(folder: str, forbidden: tuple[str, ...]) -> None:
    assert _offenders(folder, forbidden) == []


def test_views_reach_the_services_without_the_application_factory() -> None:
    """api/app.py imports every view; a view importing it back made one import circle of
    the whole API."""
    views = [path for path in (ROOT / "api").glob("*.py") if path.name != "app.py"]
    assert [str(path.relative_to(ROOT)) for path in views
            if "labmetal.api.app" in _imports(path)] == []


def test_work_reaches_a_conductor_only_through_the_door() -> None:
    """``ConductorAPI.request`` takes a node's lock for its conductor; anyone but the door
    calling it would skip the door's checks and its one way of refusing."""
    callers = []
    for folder in ("api", "conductor", "labmetal", "images"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("door.py", "rpcapi.py"):
                continue
            if "conductors.request(" in path.read_text():
                callers.append(str(path.relative_to(ROOT)))
    assert callers == []
