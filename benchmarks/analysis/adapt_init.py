"""Which personal parts should a new hospital start from? ``fedoap adapt --init`` compared.

The benchmark's leave-one-client-out cells adapt with ``--init averaged`` (personal parts
averaged over the federation's clients). This re-adapts the same finished federations (their
checkpoints must be present locally; they are not committed) with each of ``averaged``,
``fresh`` and ``nearest`` (the federation client whose personal parts score best on the new
client's validation split), on the same split, seed, epochs and thread count (the federation's
``train.num_threads``), and prints one table. ``averaged`` is rerun rather than read from the
cell: the cells adapted before ``fedoap adapt`` honoured ``train.num_threads``, and a different
thread count trains a slightly different model.

    python benchmarks/analysis/adapt_init.py benchmarks/results/federation4 \
        -o benchmarks/results/federation4-adapt-init [--method fedoap] [--only CLIENT ...] \
        [--inits averaged fresh nearest]

Each (client, init) writes ``OUT/<client>-<init>/summary.json`` and is skipped when present, so
several invocations (``--only``) can run side by side and the table is rebuilt from the files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedoap.adapt import adapt, write_adapt

INITS = ("averaged", "fresh", "nearest")


def loo_cells(root: Path, method: str) -> dict[str, Path]:
    """Held-out client -> leave-one-out cell folder with a finished adaptation."""
    out = {}
    for cell in sorted((root / "cells").iterdir()):
        meta_path = cell / "cell.json"
        if not meta_path.is_file() or not (cell / "adapt" / "summary.json").is_file():
            continue
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") == "loo" and meta.get("method") == method:
            out[meta["heldout"]] = cell
    return out


def summaries(
    cells: dict[str, Path], out: Path, only: list[str], inits: list[str]
) -> dict[tuple[str, str], dict]:
    result = {}
    for client, cell in cells.items():
        cell_summary = json.loads((cell / "adapt" / "summary.json").read_text())
        for init in inits:
            path = out / f"{client}-{init}" / "summary.json"
            if not path.is_file():
                if only and client not in only:
                    continue
                s = adapt(
                    cell / "run",
                    Path(cell_summary["data"]),
                    client,
                    epochs=cell_summary["epochs"],
                    parts=cell_summary["parts"],
                    init=init,
                )
                write_adapt(s, path.parent, force=False)
            result[(client, init)] = json.loads(path.read_text())
    return result


def table(result: dict[tuple[str, str], dict]) -> str:
    lines = [
        "| held-out client | init | started from | zero-shot Dice | adapted Dice (epoch) "
        "| local_only | local_full |",
        "|---|---|---|---|---|---|---|",
    ]
    for (client, init), s in sorted(
        result.items(), key=lambda kv: (kv[0][0], INITS.index(kv[0][1]))
    ):
        start = s.get("init_from", init)
        lines.append(
            f"| {client} | {init} | {start} | {s['zero_shot']['test']['dice']:.3f} "
            f"| {s['adapted']['test']['dice']:.3f} ({s['adapted']['best_epoch']}) "
            f"| {s['local_only']['test']['dice']:.3f} | {s['local_full']['test']['dice']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--method", default="fedoap")
    p.add_argument("--only", nargs="*", default=[], help="held-out clients to run now")
    p.add_argument("--inits", nargs="*", default=list(INITS), choices=INITS)
    args = p.parse_args()
    result = summaries(loo_cells(args.results, args.method), args.out, args.only, args.inits)
    print(table(result))


if __name__ == "__main__":
    main()
