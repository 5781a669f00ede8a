"""`llmkd/` at a glance: core modules, `serving/` and `experiments/`. The experiment drivers live in
`llmkd/experiments/`, and nothing outside it imports them (module level or inside a function), so the core
pipeline and the service never depend on a benchmark."""

from __future__ import annotations

from conftest import REPO
from test_serving_layout import imports

PACKAGE = REPO / "llmkd"
EXPERIMENTS = PACKAGE / "experiments"
DRIVERS = {"kd_benchmark", "seeds", "online", "coldstart", "serving_cost"}


def core_files() -> list:
    return [p for p in PACKAGE.rglob("*.py") if EXPERIMENTS not in p.parents]


def test_the_drivers_live_in_experiments():
    assert {p.stem for p in EXPERIMENTS.glob("*.py")} >= DRIVERS
    assert not [name for name in DRIVERS | {"benchmark"} if (PACKAGE / f"{name}.py").exists()]


def test_core_and_serving_never_import_experiments():
    files = core_files()
    assert PACKAGE / "commands" / "add_items.py" in files and PACKAGE / "serving" / "recommender.py" in files
    bad = {str(p.relative_to(REPO)): sorted(m for m in imports(p) if m.startswith("llmkd.experiments"))
           for p in files}
    assert not {k: v for k, v in bad.items() if v}


def test_the_check_sees_a_function_level_import(tmp_path):
    """The check above would pass vacuously if the scanner missed an import inside a function."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from llmkd.experiments.coldstart import set_metrics\n")
    assert "llmkd.experiments.coldstart" in imports(probe, package="llmkd")
