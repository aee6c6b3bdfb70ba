"""The benchmark: methods x seeds, FedOAP ablations and leave-one-client-out, cached per cell.

A benchmark spec (``benchmarks/federation4.yaml``) names a base run config and the matrix. Every
*cell* is one run: (kind, variant, seed) with its resolved config. A cell lives in
``OUT/cells/<variant>-seed<k>-<digest>/`` and is skipped when its ``summary.json`` exists, so an
interrupted or extended benchmark only runs what is missing; a killed cell resumes from its last
checkpoint. ``--max-cells`` splits the work into chunks across invocations. After every cell,
``OUT/results.csv`` is rewritten from all finished cells.

Cells run as ``fedoap run`` subprocesses, ``--jobs`` at a time, each with ``cores / jobs`` torch
threads, where ``cores`` is :func:`fedoap.cpu.cpu_budget` (``OMP_NUM_THREADS`` when set, else the
cores the process may run on). Two single-thread runs give about 25% more throughput than one
two-thread run on a 2-core machine. The thread count is not part of a cell's identity.

The package, one job per module: :mod:`~fedoap.bench.spec` (the spec YAML),
:mod:`~fedoap.bench.planning` (the cells, their configs and identities),
:mod:`~fedoap.bench.running` (running and resuming cells), :mod:`~fedoap.bench.examples` (the
report's example masks) and :mod:`~fedoap.bench.results` (``results.csv`` and ``cases.csv`` from
the finished cells).
"""

from fedoap.bench.examples import example_indices, save_examples
from fedoap.bench.planning import Cell, derive, digest, plan, select_variants
from fedoap.bench.results import (
    CASE_RESULT_FIELDS,
    DIVERGED,
    FORMULA_START,
    RESULT_FIELDS,
    case_rows,
    cell_rows,
    clean_digest,
    collect,
    finished_cells,
    write_results,
)
from fedoap.bench.running import (
    BenchError,
    is_done,
    needs_examples,
    record_divergence,
    run_bench,
    run_cell,
    write_cell_meta,
)
from fedoap.bench.spec import (
    AblationSpec,
    AttackGridSpec,
    BenchSpec,
    LOOSpec,
    RegimeSpec,
    VariantSpec,
    load_spec,
)

__all__ = [
    "CASE_RESULT_FIELDS",
    "DIVERGED",
    "FORMULA_START",
    "RESULT_FIELDS",
    "AblationSpec",
    "AttackGridSpec",
    "BenchError",
    "BenchSpec",
    "Cell",
    "LOOSpec",
    "RegimeSpec",
    "VariantSpec",
    "case_rows",
    "cell_rows",
    "clean_digest",
    "collect",
    "derive",
    "digest",
    "example_indices",
    "finished_cells",
    "is_done",
    "load_spec",
    "needs_examples",
    "plan",
    "record_divergence",
    "run_bench",
    "run_cell",
    "save_examples",
    "select_variants",
    "write_cell_meta",
    "write_results",
]
