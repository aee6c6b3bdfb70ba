"""One "regimes" table across several benchmark results folders (docs/results/regimes.md):
the summary of ``fedoap report`` (best method without pooling, best − local,
FedOAP − local and FedAvg − local, paired by seed with 95% CIs), with a folder whose results
carry no regime (e.g. federation4) named after the folder. Main-matrix rows only.

    python benchmarks/analysis/regimes_table.py benchmarks/results/federation4 \
        benchmarks/results/regimes
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedoap.report import load_rows, privacy_breaking, regimes_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="folders holding results.csv")
    args = ap.parse_args()
    rows = []
    for folder in args.results:
        for r in load_rows(folder / "results.csv"):
            rows.append({**r, "regime": r["regime"] or folder.name})
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    print("\n".join(regimes_summary(rows, regimes, privacy_breaking(rows))))


if __name__ == "__main__":
    main()
