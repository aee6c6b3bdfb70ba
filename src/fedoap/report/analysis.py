"""A study's own sections in ``fedoap report``: its goals and verdicts, on top of the generic
report.

The generic report describes any ``fedoap bench`` results folder; what counts as success is a
study's to say. A study writes a Python file that binds ``ANALYSIS`` to an instance of a subclass
of :class:`Analysis`, overriding only the hooks it needs, and names it on the command line::

    fedoap report benchmarks/results/robustness --analysis benchmarks/analysis/goals.py

or in code, ``make_report(results, analysis=Path("goals.py"))``. The file is run as Python, so
only name a file you trust; the results folder never names one itself. Every hook returns
markdown lines (a section ends with a blank line) and adds nothing by default. Names taken from
the results reach the text through :func:`fedoap.report.markdown.md`.

A minimal file::

    from fedoap.report import Analysis, Table

    class Goals(Analysis):
        def main(self, table: Table, private: set[str]) -> list[str]:
            ok = table.mean("fedoap").mean > table.mean("local").mean
            return [f"- FedOAP above local: **{'yes' if ok else 'no'}**", ""]

    ANALYSIS = Goals()
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from fedoap.errors import ConfigError, NotFoundError
from fedoap.patients import Cases, Comparison
from fedoap.report.rows import Table

Honest = dict[int, float | None]  # seed -> honest sites' mean test Dice (None: diverged)


class Analysis:
    """The hooks of the report, each called where its section goes. The base adds nothing."""

    #: The variants drawn in ``dice_vs_round.png``, in this order (those that ran); None draws
    #: every variant.
    curves: tuple[str, ...] | None = None

    def main(self, table: Table, private: set[str]) -> list[str]:
        """After each regime's "All methods" table. ``table``: its main cells; ``private``: the
        variants that pool data."""
        return []

    def attacks(
        self,
        honest: dict[tuple[str, str], Honest],
        clean: dict[int, float],
        defences: list[str],
        measure: str,
    ) -> list[str]:
        """After each method's attacks x defences tables, once per ``measure`` (``"test Dice
        per image"``, then ``"test Dice per case"``). ``honest``: the honest sites' mean per
        (defence, attack) and seed, with ``(defence, "clean")`` the defence's own clean run;
        ``clean``: the method's clean run per seed; ``defences``: in the tables' order."""
        return []

    def safeguard_goal(self) -> str:
        """A sentence that ends the safeguard section's introduction and adds its ``goal``
        column, judged per row by :meth:`safeguard_verdict`; empty: no goal."""
        return ""

    def safeguard_verdict(self, vs_local: Comparison) -> str:
        """The ``goal`` cell of a safeguarded variant in one regime, from its per-patient
        comparison with local (``–`` where that comparison is missing)."""
        return "–"

    def patients(
        self, cases: Cases, results: list[dict[str, Any]], best: dict[str, str]
    ) -> list[str]:
        """At the end of the per-patient part (results folders with ``cases.csv``). ``best``:
        per regime, the FedOAP variant that validation picks."""
        return []


#: The report without a study's sections.
NO_ANALYSIS = Analysis()


def load_analysis(path: Path) -> Analysis:
    """The ``ANALYSIS`` of the Python file at ``path``. A missing file, or one that binds no
    :class:`Analysis` to that name, is refused in one line; an error inside the file is the
    file's own and keeps its traceback."""
    if not path.is_file():
        raise NotFoundError(f"analysis file {path} not found")
    name = "fedoap_analysis_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"analysis file {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    analysis = getattr(module, "ANALYSIS", None)
    if not isinstance(analysis, Analysis):
        raise ConfigError(
            f"analysis file {path} binds no ANALYSIS to an instance of fedoap.report.Analysis"
        )
    return analysis
