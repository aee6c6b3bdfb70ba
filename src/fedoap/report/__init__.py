"""``fedoap report RESULTS_DIR``: REPORT.md and figures from a benchmark's ``results.csv``.

Everything numeric comes from ``results.csv`` (and ``cases.csv``, per test patient, where the
folder has one). The report is generic: it describes any ``fedoap bench`` results folder. A
study's own goals and verdicts come from a Python file it names with ``--analysis``
(:mod:`~fedoap.report.analysis`).

``results.csv`` is read as untrusted: a score must be finite (or empty), a name that becomes part
of a file name (regime, method, variant) must be one (:func:`fedoap.fileio.safe_name`), and both
are checked before anything is written; names reach REPORT.md through
:func:`~fedoap.report.markdown.md`, as literal text.

The package, one job per module: :mod:`~fedoap.report.rows` (reading and checking
``results.csv``; :class:`Table`, per-variant statistics over seeds), :mod:`~fedoap.report.markdown`
(names as literal text; tables), :mod:`~fedoap.report.tables` (the tables of one regime),
:mod:`~fedoap.report.regimes` (the summary across regimes and the DP budgets),
:mod:`~fedoap.report.attacks` (attacks x defences), :mod:`~fedoap.report.cases` (the per-patient
comparisons), :mod:`~fedoap.report.figures` (matplotlib, loaded only to draw),
:mod:`~fedoap.report.analysis` (a study's hooks) and :mod:`~fedoap.report.compose` (REPORT.md).
"""

from fedoap.report.analysis import NO_ANALYSIS, Analysis, Honest, load_analysis
from fedoap.report.attacks import MODEL_POISONING, robustness_section
from fedoap.report.cases import patient_sections, read_cases
from fedoap.report.compose import make_report, sections
from fedoap.report.markdown import markdown_table, md, md_code, text_table
from fedoap.report.regimes import privacy_section, regimes_summary
from fedoap.report.rows import (
    FEDOAP,
    SCORES,
    Stat,
    Table,
    best_baseline,
    check_names,
    load_rows,
    points,
    privacy_breaking,
    stat,
)
from fedoap.report.tables import (
    CPU_UNNAMED,
    MIXED_MACHINES,
    ablation_table,
    case_table,
    cost_lines,
    loo_table,
    main_table,
)

__all__ = [
    "CPU_UNNAMED",
    "FEDOAP",
    "MIXED_MACHINES",
    "MODEL_POISONING",
    "NO_ANALYSIS",
    "SCORES",
    "Analysis",
    "Honest",
    "Stat",
    "Table",
    "ablation_table",
    "best_baseline",
    "case_table",
    "check_names",
    "cost_lines",
    "load_analysis",
    "load_rows",
    "loo_table",
    "main_table",
    "make_report",
    "markdown_table",
    "md",
    "md_code",
    "patient_sections",
    "points",
    "privacy_breaking",
    "privacy_section",
    "read_cases",
    "regimes_summary",
    "robustness_section",
    "sections",
    "stat",
    "text_table",
]
