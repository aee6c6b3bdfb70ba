"""``fedoap report RESULTS_DIR``: REPORT.md and figures from a benchmark's ``results.csv``.

Everything numeric comes from ``results.csv``. The image grid also needs the data folder named
in the cells' configs (images are never stored with results) and the predicted masks the
benchmark kept (``cells/*/examples.npz``); without them the grid is skipped with a note.

Statistics: for each (method, client) the mean over seeds and a 95% confidence interval
``t_{0.975, n-1} * sd / sqrt(n)``; the "mean" column averages clients within each seed first.

``results.csv`` is read as untrusted: a score must be finite (or empty), a name that becomes part
of a file name (regime, method, variant) must be one (:func:`fedoap.fileio.safe_name`), and both
are checked before anything is written; names reach REPORT.md through
:func:`fedoap.casereport.md`, as literal text.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from fedoap.casereport import md, md_code, patient_sections, read_cases
from fedoap.data.errors import DataError
from fedoap.errors import NotFoundError
from fedoap.fileio import atomic_write_text, check_output_dir, safe_name, save_figure
from fedoap.patients import check_score

FEDOAP = "fedoap"
MAIN_CURVES = ("fedoap", "feddp", "local", "fedavg", "fedavg_ft", "ditto")


@dataclass(frozen=True)
class Stat:
    mean: float
    ci: float  # half-width of the 95% CI (0 with one seed)
    n: int

    def fmt(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "–"
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.ci:.{digits}f}"


def stat(values: Iterable[float]) -> Stat:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return Stat(float("nan"), float("nan"), 0)
    if len(v) == 1:
        return Stat(float(v[0]), 0.0, 1)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return Stat(float(v.mean()), float(half), len(v))


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table, one line per row."""
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    return [lines[0], "|" + "---|" * len(header), *lines[1:]]


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """:func:`markdown_table` of cells that are plain text, each written through :func:`md`: the
    tables that are also drawn as figures, which show the same cells as they are."""
    return markdown_table([md(h) for h in header], [[md(c) for c in row] for row in rows])


def points(d: Stat) -> str:
    """A paired difference in points of Dice; one seed gives no interval, and says so."""
    if d.n < 2:
        return f"{100 * d.mean:+.1f} (n = {d.n}: one seed, no interval)"
    return f"{100 * d.mean:+.1f} ± {100 * d.ci:.1f} (n = {d.n})"


def _num(x: Any) -> float:
    return float(x) if x not in ("", None) else float("nan")


#: The scores of results.csv: each a finite number, or empty where it is undefined.
SCORES = ("test_dice", "test_iou", "test_hd95_px", "test_case_dice", "val_dice")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """``results.csv`` with its numbers parsed. Errors name the file and line: a row that is
    not a fedoap results row, a score that is a number but not a finite one, or a name that
    cannot be part of a file name (:func:`check_names`)."""
    if not path.is_file():
        raise NotFoundError(f"{path} not found: run fedoap bench first")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        for k in SCORES:
            check_score(r.get(k), k, f"{path}, line {i}")
        try:
            for k in (
                "test_dice",
                "test_iou",
                "test_hd95_px",
                "test_case_dice",
                "val_dice",
                "bytes_up_per_round",
                "bytes_down_per_round",
                "seconds_per_round",
                "seconds_total",
                "peak_memory_gib",
                "epsilon",
                "client_epsilon",
            ):
                r[k] = _num(r.get(k, ""))
            r["seed"] = int(r["seed"])
            r["regime"] = r.get("regime") or ""  # results from before regimes have none
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}, line {i}: not a fedoap results row ({err!r})") from None
        check_names(r, f"{path}, line {i}")
    return rows


def check_names(row: dict[str, Any], where: str) -> None:
    """The row's names that name folders and files (:func:`fedoap.fileio.safe_name`): its
    regime (``figures/<regime>/``, the cell folders' prefix), its method (``robustness_<method>
    .png``) and its variant (the cell folders the image grid reads), except a leave-one-out
    row's, which is ``<method>:<stage>`` and names nothing."""
    if row["regime"]:
        safe_name(row["regime"], "regime", where)
    safe_name(row.get("method") or "", "method", where)
    if row.get("kind") != "loo":
        safe_name(row.get("variant") or "", "variant", where)


#: How the report names a CPU cell from before runs recorded the processor's model.
CPU_UNNAMED = "a CPU whose model was not recorded"


#: Said when the cells of one report ran on more than one machine.
MIXED_MACHINES = (
    "These cells ran on more than one machine. The same config and seed give different last "
    "digits on different processors, and training can amplify them into whole Dice points "
    "(the README's robustness section measures one such case). Paired differences between "
    "cells from different machines include that."
)


def cost_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Where the cells ran and, on a GPU, each variant's wall time and peak memory per cell."""
    devices = sorted({str(r.get("device_name") or "") for r in rows} - {""})
    if not devices:
        return []  # results from before the device was recorded
    # Before CPU runs recorded their processor, a CPU cell's device was just "cpu".
    named = [CPU_UNNAMED if d == "cpu" else md(d) for d in devices]
    out = [f"Machine: {', '.join(named)}.", ""] + ([MIXED_MACHINES, ""] if len(devices) > 1 else [])
    cells: dict[tuple[str, str], dict[tuple[Any, ...], dict[str, Any]]] = {}
    for r in rows:
        key = (r["config_digest"], r["seed"], r.get("client") if r["kind"] == "loo" else None)
        cells.setdefault((r["kind"], r["variant"]), {})[key] = r
    if not any(not math.isnan(r["peak_memory_gib"]) for r in rows):
        return out
    body = []
    for (kind, variant), found in sorted(cells.items()):
        secs = [r["seconds_total"] for r in found.values() if not math.isnan(r["seconds_total"])]
        mem = [r["peak_memory_gib"] for r in found.values() if not math.isnan(r["peak_memory_gib"])]
        body.append(
            [
                md(kind),
                md(variant),
                str(len(found)),
                f"{np.mean(secs):.0f}" if secs else "-",
                f"{max(mem):.1f}" if mem else "-",
            ]
        )
    header = ["kind", "variant", "cells", "seconds per cell (mean)", "peak GPU memory GiB (max)"]
    return [*out, "### Cost per cell", "", *markdown_table(header, body), ""]


class Table:
    """Per (variant, client) statistics over seeds for one kind of rows."""

    def __init__(
        self, rows: list[dict[str, Any]], kind: str, seeds: Iterable[int] | None = None
    ) -> None:
        keep = None if seeds is None else set(seeds)
        self.rows = [r for r in rows if r["kind"] == kind and (keep is None or r["seed"] in keep)]
        self.variants = list(dict.fromkeys(r["variant"] for r in self.rows))
        self.clients = list(dict.fromkeys(r["client"] for r in self.rows))
        self.by: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in self.rows:
            self.by[(r["variant"], r["client"])].append(r)

    def cell(self, variant: str, client: str, key: str = "test_dice") -> Stat:
        return stat(r[key] for r in self.by[(variant, client)])

    def per_seed(self, variant: str, key: str = "test_dice") -> dict[int, float]:
        """Seed -> mean over clients, for the seeds where every client has a value."""
        per_seed: dict[int, list[float]] = defaultdict(list)
        for r in self.rows:
            if r["variant"] == variant and not math.isnan(r[key]):
                per_seed[r["seed"]].append(r[key])
        return {s: float(np.mean(v)) for s, v in per_seed.items() if len(v) == len(self.clients)}

    def mean(self, variant: str, key: str = "test_dice") -> Stat:
        return stat(self.per_seed(variant, key).values())

    def paired(self, a: str, b: str, key: str = "test_dice") -> Stat:
        """``a - b`` of the client-mean, paired by seed (same splits and initial weights)."""
        pa, pb = self.per_seed(a, key), self.per_seed(b, key)
        return stat(pa[s] - pb[s] for s in sorted(set(pa) & set(pb)))

    def seeds(self, variant: str) -> list[int]:
        return sorted({r["seed"] for r in self.rows if r["variant"] == variant})

    def worst(self, variant: str) -> tuple[str, Stat]:
        cells = {c: self.cell(variant, c) for c in self.clients}
        c = min(cells, key=lambda k: cells[k].mean)
        return c, cells[c]

    def first(self, variant: str, key: str) -> float:
        vals = [r[key] for r in self.rows if r["variant"] == variant]
        return float(np.nanmean(vals)) if vals else float("nan")


def privacy_breaking(rows: list[dict[str, Any]]) -> set[str]:
    return {r["variant"] for r in rows if r.get("breaks_privacy") in ("1", 1, "True")}


# ------------------------------------------------------------------------------ figures


def _colors(variants: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab20")
    out: dict[str, Any] = {v: cmap(i % 20) for i, v in enumerate(variants)}
    if FEDOAP in out:
        out[FEDOAP] = "crimson"
    return out


def fig_per_client(t: Table, key: str, label: str, path: Path, higher_better: bool) -> None:
    n = len(t.clients)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 0.32 * len(t.variants) + 1.6), sharey=True)
    axes = np.atleast_1d(axes)
    order = sorted(t.variants, key=lambda v: t.mean(v, key).mean, reverse=not higher_better)
    colors = _colors(t.variants)
    for ax, client in zip(axes, t.clients, strict=True):
        s = [t.cell(v, client, key) for v in order]
        y = np.arange(len(order))
        ax.barh(
            y,
            [x.mean for x in s],
            xerr=[x.ci for x in s],
            color=[colors[v] for v in order],
            error_kw={"lw": 0.8, "capsize": 2},
        )
        ax.set_yticks(y, order, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(client, fontsize=10)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{label} per client (mean ± 95% CI over seeds)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_curves(t: Table, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = _colors(t.variants)
    for v in [v for v in MAIN_CURVES if v in t.variants]:
        curves = [
            [_num(x) for x in r["val_curve"].split(";")]
            for r in t.rows
            if r["variant"] == v and r.get("val_curve")
        ]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        arr = np.array([c[:length] for c in curves])
        ax.plot(
            np.arange(1, length + 1),
            np.nanmean(arr, 0),
            marker="o",
            ms=3,
            label=v,
            color=colors[v],
            lw=2 if v == FEDOAP else 1.2,
        )
    ax.set_xlabel("round (fine-tuning epochs continue the axis)")
    ax.set_ylabel("validation Dice (mean over clients and seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_cost(t: Table, path: Path, private: set[str]) -> None:
    # Most federated methods send about the same bytes, so labels next to the points would pile
    # up: each method gets a marker and a legend entry (sorted by Dice) that states its cost.
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = _colors(t.variants)
    markers = "osD^vP*Xh<>p"
    order = sorted(t.variants, key=lambda v: t.mean(v).mean, reverse=True)
    for i, v in enumerate(order):
        mb = (t.first(v, "bytes_up_per_round") + t.first(v, "bytes_down_per_round")) / 1e6
        m = t.mean(v)
        label = f"{v} ({mb:.2f} MB)" + (" — pools data" if v in private else "")
        ax.errorbar(
            mb,
            m.mean,
            yerr=m.ci,
            fmt=markers[i % len(markers)],
            color=colors[v],
            ms=8 if v == FEDOAP else 6,
            capsize=2,
            label=label,
        )
    ax.set_xlabel("MB per client per round (up + down; 0 = nothing travels)")
    ax.set_ylabel("mean test Dice over clients (± 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_table(header: list[str], rows: list[list[str]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(1.7 * len(header), 0.34 * len(rows) + 0.9))
    ax.axis("off")
    tab = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def fig_grid(results: Path, variants: list[str], path: Path, prefix: str = "") -> str | None:
    """Test images with the ground truth and each variant's prediction outlined."""
    from fedoap.config import load_config
    from fedoap.data import prepare_clients

    examples = {}
    cfg_path = None
    for v in variants:
        found = sorted((results / "cells").glob(f"{prefix}{v}-seed*-*/examples.npz"))
        if found:
            examples[v] = np.load(found[0])
            cfg_path = found[0].parent / "config.yaml"
    if not examples or cfg_path is None:
        return "no examples.npz in the cells: image grid skipped"
    try:
        clients = {c.name: c for c in prepare_clients(load_config(cfg_path).data)}
    except (OSError, ValueError) as err:
        return f"data not available ({md(err)}): image grid skipped"
    first = next(iter(examples.values()))
    names = [k.split("/")[0] for k in first.files if k.endswith("/pred")]
    k = len(first[f"{names[0]}/names"])
    colors = {
        "ground truth": "lime",
        **dict(zip(variants, ["red", "deepskyblue", "yellow", "magenta"], strict=False)),
    }
    fig, axes = plt.subplots(
        len(names), k, figsize=(2.3 * k, 2.4 * len(names)), squeeze=False
    )  # (clients, examples) even when either is 1
    for i, name in enumerate(names):
        test = clients[name].test
        index = {n: j for j, n in enumerate(test.names)}
        for j, img_name in enumerate(first[f"{name}/names"]):
            ax = axes[i, j]
            idx = index[str(img_name)]
            ax.imshow(test.x[idx, 0].numpy(), cmap="gray")
            ax.contour(test.y[idx, 0].numpy(), [0.5], colors=colors["ground truth"], linewidths=1.2)
            for v, ex in examples.items():
                pred = ex[f"{name}/pred"][j]
                if pred.any():
                    ax.contour(pred.astype(float), [0.5], colors=colors[v], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    handles = [
        plt.Line2D([], [], color=c, label=label)
        for label, c in colors.items()
        if label == "ground truth" or label in examples
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------ report


def best_baseline(t: Table, client: str | None, exclude: set[str]) -> str | None:
    """The non-FedOAP variant with the highest mean test Dice (on ``client``, or overall)."""
    cands = [v for v in t.variants if v != FEDOAP and v not in exclude]
    if not cands:
        return None
    key = (lambda v: t.cell(v, client).mean) if client else (lambda v: t.mean(v).mean)
    return max(cands, key=key)


def sections(
    results: Path, rows: list[dict[str, Any]], regime: str, private: set[str]
) -> list[str]:
    """The tables and figures of one regime (all rows when the spec has one base). Figures go
    to ``figures/`` or, per regime, ``figures/<regime>/``."""
    rel = f"figures/{regime}" if regime else "figures"
    prefix = f"{regime}-" if regime else ""
    figs = results / rel
    figs.mkdir(parents=True, exist_ok=True)
    main = Table(rows, "main")
    lines: list[str] = []
    if main.rows:
        seeds = sorted({r["seed"] for r in main.rows})
        lines += [f"Seeds: {seeds}. Clients: {', '.join(map(md, main.clients))}.", ""]
        lines += main_table(main, private)
        lines += goals(main, private)
        lines += case_table(main, private)
        fig_per_client(main, "test_dice", "test Dice", figs / "per_client_dice.png", True)
        fig_per_client(main, "test_hd95_px", "test HD95 (px)", figs / "hd95_per_client.png", False)
        fig_curves(main, figs / "dice_vs_round.png")
        fig_cost(main, figs / "dice_vs_bytes.png", private)
        lines += [
            "## Figures",
            "",
            f"![per-client Dice]({rel}/per_client_dice.png)",
            "",
            f"![Dice vs round]({rel}/dice_vs_round.png)",
            "",
            f"![HD95 per client]({rel}/hd95_per_client.png)",
            "",
            f"![Dice vs bytes]({rel}/dice_vs_bytes.png)",
            "",
        ]
        best = best_baseline(main, None, private | {"local"})
        shown = [v for v in (FEDOAP, best, "local") if v is not None and v in main.variants]
        note = fig_grid(results, shown, figs / "examples.png", prefix)
        legend = "; ".join(
            f"{c}: {md(v)}" + (" (best baseline by mean Dice)" if v == best else "")
            for c, v in zip(("red", "blue", "yellow"), shown, strict=False)
        )
        lines += [
            "### Test images (seed 0)",
            "",
            note or f"Green: ground truth; {legend}.\n\n![examples]({rel}/examples.png)",
            "",
        ]
    ab = Table(rows, "ablation")
    if ab.rows:
        lines += ablation_table(main, ab, figs, rel)
    loo = Table(rows, "loo")
    if loo.rows:
        lines += loo_table(loo, figs, rel)
    if any(r["kind"] == "attack" for r in rows):
        lines += robustness_section(rows, figs, rel)
    return lines


#: The attacks that poison the model a site sends (``invert_masks`` poisons its data instead).
MODEL_POISONING = ("nan", "scale", "sign_flip", "noise")


Honest = dict[int, float | None]  # seed -> honest sites' mean test Dice (None: diverged)


def _drop(per: Honest, clean: dict[int, float]) -> Stat:
    """Clean minus attacked, in points of Dice, paired by seed (diverged seeds excluded)."""
    return stat(100 * (clean[k] - v) for k, v in per.items() if k in clean and v is not None)


def _robust_cell(per: Honest | None, clean: dict[int, float], show_n: bool = False) -> str:
    """One attack x defence cell; ``show_n`` adds its number of seeds, for a table whose cells
    ran different numbers of seeds."""
    if not per:
        return "-"
    n = f" [n={len(per)}]" if show_n else ""
    if any(v is None for v in per.values()):
        diverged = sum(v is None for v in per.values())
        return f"diverged ({diverged} of {len(per)} seeds)" if len(per) > 1 else "diverged"
    d = stat(100 * (v - clean[k]) for k, v in per.items() if k in clean and v is not None)
    cell = stat(per.values()).fmt()  # type: ignore[arg-type]
    return cell + (f" ({d.mean:+.1f})" if d.n else "") + n


def _per_site_table(
    by_cell: dict[tuple[str, str, int], list[dict[str, Any]]],
    clean_rows: list[dict[str, Any]],
    defences: list[str],
    kinds: list[str],
) -> list[str]:
    """Each honest site's test Dice per attack and defence, per image / per case (means over
    seeds): a mean over sites can hide one site's loss behind another's gain, and image Dice can
    hide an empty predictor on a site of mostly empty slices."""
    clients = list(dict.fromkeys(r["client"] for r in clean_rows))

    def both(mine: list[dict[str, Any]], c: str) -> str:
        ours = [r for r in mine if r["client"] == c]
        image = stat(r["test_dice"] for r in ours)
        case = stat(_num(r.get("test_case_dice")) for r in ours)
        return f"{image.mean:.3f} / {case.mean:.3f}" if case.n else f"{image.mean:.3f}"

    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    diverged: set[tuple[str, str]] = set()
    for (defence, kind, _), mine in by_cell.items():
        if any(r.get("diverged") for r in mine):
            diverged.add((defence, kind))
        else:
            cells[(defence, kind)] += mine
    body = [["clean (validation, mean)", "", *[both(clean_rows, c) for c in clients]]]
    for kind in kinds:
        for d in defences:
            if (d, kind) in diverged:
                body.append([md(kind), md(d), *["diverged"] * len(clients)])
            elif (d, kind) in cells:
                body.append([md(kind), md(d), *[both(cells[(d, kind)], c) for c in clients]])
    return [
        "Per honest site (test Dice per image / per case, mean over seeds):",
        "",
        *markdown_table(["attack", "defence", *map(md, clients)], body),
        "",
    ]


def robustness_goal(
    honest: dict[tuple[str, str], Honest],
    clean: dict[int, float],
    defences: list[str],
    measure: str = "test Dice per image",
) -> list[str]:
    """The issue's goal: with validation and the best robust aggregator, the honest sites stay
    within 2 points of clean (mean drop over seeds) under every model-poisoning attack. Only a
    defence that ran every one of those attacks can be judged; one that missed some is listed,
    never picked as the best on the attacks it happened to run."""
    worst: dict[str, float] = {}
    own: dict[str, float] = {}  # the same, against the defence's own clean run
    missing: dict[str, list[str]] = {}
    seeds: dict[str, int] = {}
    for d in defences:
        cells = {k: honest.get((d, k)) for k in MODEL_POISONING}
        missing[d] = [k for k, per in cells.items() if not per]
        ran = [per for per in cells.values() if per]
        if ran:
            worst[d] = max(
                math.inf if any(v is None for v in per.values()) else _drop(per, clean).mean
                for per in ran
            )
            seeds[d] = min(len(per) for per in ran)
            base = {s: v for s, v in (honest.get((d, "clean")) or {}).items() if v is not None}
            drops = [
                math.inf if any(v is None for v in per.values()) else _drop(per, base).mean
                for per in ran
            ]
            if base and not any(math.isnan(x) for x in drops):
                own[d] = max(drops)
    judged = {d: w for d, w in worst.items() if d not in ("none", "validation") and not missing[d]}
    partial = [d for d in worst if d not in ("none", "validation") and missing[d]]
    if not judged and not partial:
        return []
    if judged:
        # Rules are compared on equal footing: only those with the most seeds behind them (a
        # rule's one good seed must not beat another's three).
        most = max(seeds[d] for d in judged)
        best = min((d for d in judged if seeds[d] == most), key=lambda d: judged[d])
        verdict = "met" if judged[best] <= 2.0 else "not met"
        head = (
            f"**{verdict}**. The best is {md_code(best)}, whose worst drop is "
            f"{judged[best]:.1f} points (mean over seeds; the fewest seeds behind one of its "
            f"cells: {seeds[best]})."
        )
        fewer = [d for d in judged if seeds[d] < most]
        if fewer:
            head += (
                " Not compared, on fewer seeds: "
                + ", ".join(f"{md(d)} (n={seeds[d]})" for d in fewer)
                + "."
            )
    else:
        head = "**not judged**: no robust aggregator ran every model-poisoning attack."
    out = [
        f"Goal, by {measure} (validation + the best robust aggregator keeps the honest sites "
        "within 2 points of clean under every model-poisoning attack: "
        f"{', '.join(MODEL_POISONING)}): {head} "
        "Worst drop per defence (+: below clean): "
        + ", ".join(f"{md(d)} {w:.1f}" for d, w in worst.items())
        + "."
    ]
    if own:
        out[0] += (
            " The attack's own damage, against each defence's clean run (which already differs "
            "from the mean's): " + ", ".join(f"{md(d)} {w:.1f}" for d, w in own.items()) + "."
        )
    if partial:
        out[0] += (
            " Not judged, for attacks not run: "
            + "; ".join(f"{md(d)} (no {', '.join(map(md, missing[d]))})" for d in partial)
            + "."
        )
    return [*out, ""]


def _robust_table(
    means: dict[tuple[str, str], Honest],
    clean: dict[int, float],
    defences: list[str],
    kinds: list[str],
    show_n: bool,
) -> list[str]:
    """Attacks (rows) x defences (columns) of the honest sites' mean Dice."""
    body = [
        [md(k), *[_robust_cell(means.get((d, k)), clean, show_n) for d in defences]] for k in kinds
    ]
    return markdown_table(["attack", *map(md, defences)], body)


def _honest_means(
    by_cell: dict[tuple[str, str, int], list[dict[str, Any]]],
    clean_rows: list[dict[str, Any]],
    metric: str,
) -> tuple[dict[tuple[str, str], Honest], dict[int, float]]:
    """The honest sites' mean ``metric`` per (defence, attack) and seed (None: diverged), and
    the clean run's per seed."""
    honest: dict[tuple[str, str], Honest] = defaultdict(dict)
    for (defence, kind, seed), mine in by_cell.items():
        if any(r.get("diverged") for r in mine):
            honest[(defence, kind)][seed] = None
        else:
            honest[(defence, kind)][seed] = float(np.mean([_num(r.get(metric)) for r in mine]))
    clean = {
        seed: float(np.mean([_num(r.get(metric)) for r in clean_rows if r["seed"] == seed]))
        for seed in sorted({r["seed"] for r in clean_rows})
    }
    return honest, clean


def robustness_section(rows: list[dict[str, Any]], figs: Path, rel: str) -> list[str]:
    """Attacks x defences (``attack`` cells): the honest sites' mean test Dice, against the
    method's clean run (its ``main`` cell: validation and the mean, no attack), paired by seed;
    per image (the issue's measure) and per case (which an empty predictor cannot inflate).
    A run the attack made diverge has no scores: it is shown as such, never as a number."""
    attack = [r for r in rows if r["kind"] == "attack"]
    attackers = {r["client"] for r in attack if str(r.get("attacker")) == "1"}
    lines = ["## Robustness: attacks x defences", ""]
    for method in dict.fromkeys(r["method"] for r in attack):
        refused: dict[str, int] = defaultdict(int)
        by_cell: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
        for r in attack:
            if r["method"] == method and r["client"] not in attackers:
                _, defence, kind = r["variant"].split(".")
                by_cell[(defence, kind, r["seed"])].append(r)
        for (defence, _, _), mine in by_cell.items():
            if not any(r.get("diverged") for r in mine):
                count = _num(mine[0].get("refused", ""))
                refused[defence] += 0 if math.isnan(count) else int(count)
        clean_rows = [
            r
            for r in rows
            if r["kind"] == "main" and r["variant"] == method and r["client"] not in attackers
        ]
        honest, clean = _honest_means(by_cell, clean_rows, "test_dice")
        by_case, clean_case = _honest_means(by_cell, clean_rows, "test_case_dice")
        # No defence and validation alone first, then the robust rules.
        found = list(dict.fromkeys(d for d, _ in honest))
        defences: list[str] = [d for d in ("none", "validation") if d in found]
        defences += [d for d in found if d not in defences]
        kinds = list(dict.fromkeys(k for _, k in honest))
        # A defence without overrides (validation alone) has no clean cell of its own: its
        # clean run is the main cell, for each seed whose attack cells say so (clean_digest).
        # Any other defence without its clean cell shows "-" (not run) there.
        main_digest = {r["seed"]: r.get("config_digest") for r in clean_rows}
        for d in defences:
            if honest.get((d, "clean")):
                continue
            same = {
                s
                for (dd, _, s), mine in by_cell.items()
                if dd == d and s in main_digest and mine[0].get("clean_digest") == main_digest[s]
            }
            honest[(d, "clean")] = {s: v for s, v in clean.items() if s in same}
            by_case[(d, "clean")] = {s: v for s, v in clean_case.items() if s in same}
        kinds = ["clean", *[k for k in kinds if k != "clean"]]
        seeds_run = sorted({s for per in honest.values() for s in per})
        uneven = len({len(per) for per in honest.values() if per}) > 1

        refused_row = (
            "| uploads refused (all cells) | "
            + " | ".join(str(refused[d]) for d in defences)
            + " |"
        )
        ref = stat(clean[s] for s in seeds_run if s in clean)
        ref_case = stat(clean_case[s] for s in seeds_run if s in clean_case)
        lines += [
            f"### {md(method)}",
            "",
            f"Attacker(s): {', '.join(map(md, sorted(attackers)))}; honest sites: the others. "
            f"Seeds: {seeds_run}. Each cell: the honest sites' mean test Dice (mean ± 95% CI over "
            f"seeds) and, in brackets, its difference in points from the clean run ({md(method)} "
            f"with validation and the mean, no attack: {ref.fmt()}), paired by seed. `diverged`: "
            "the attack made the global model non-finite and the run stopped (no scores)."
            + (
                " The cells ran different numbers of seeds: `[n=k]` gives each one's."
                if uneven
                else ""
            ),
            "",
            *_robust_table(honest, clean, defences, kinds, uneven),
            refused_row,
            "",
            "The same by case Dice (each patient's or video's pixels pooled; an empty prediction "
            "scores 0 on a case with tumour, where per-image Dice scores every empty slice "
            f"predicted empty as 1). Clean: {ref_case.fmt()}.",
            "",
            *_robust_table(by_case, clean_case, defences, kinds, uneven),
            "",
        ]
        lines += _per_site_table(by_cell, clean_rows, defences, kinds)
        lines += robustness_goal(honest, clean, defences)
        lines += robustness_goal(by_case, clean_case, defences, "test Dice per case")
        fig_robustness(method, honest, clean, defences, kinds, figs / f"robustness_{method}.png")
        lines += [f"![robustness]({rel}/robustness_{method}.png)", ""]
    return lines


def fig_robustness(
    method: str,
    honest: dict[tuple[str, str], Honest],
    clean: dict[int, float],
    defences: list[str],
    kinds: list[str],
    path: Path,
) -> None:
    """Grouped bars: the honest sites' mean test Dice per attack (groups) and defence (bars);
    a cross at 0 marks a run that diverged, the dashed line is the clean run."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(kinds)), 3.6))
    width = 0.8 / max(len(defences), 1)
    colors = _colors(defences)
    for j, d in enumerate(defences):
        for i, kind in enumerate(kinds):
            per = honest.get((d, kind), {})
            x = i + (j - (len(defences) - 1) / 2) * width
            if not per:
                continue
            if any(v is None for v in per.values()):
                ax.plot([x], [0.0], marker="x", color=colors[d], markersize=8)
                continue
            s = stat(per.values())  # type: ignore[arg-type]
            ax.bar(
                x,
                s.mean,
                width,
                yerr=s.ci if s.n > 1 else None,
                color=colors[d],
                label=d if i == 0 else None,
            )
    if clean:
        ax.axhline(float(np.mean(list(clean.values()))), ls="--", color="k", lw=1, label="clean")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("honest sites' test Dice")
    ax.set_title(f"{method}: attacks x defences (x: diverged)")
    ax.legend(fontsize=7, ncol=3, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _paired_or_dash(t: Table, a: str, b: str) -> str:
    return points(t.paired(a, b)) if a in t.variants and b in t.variants else "-"


def regimes_summary(rows: list[dict[str, Any]], regimes: list[str], private: set[str]) -> list[str]:
    """Per regime: the best method by mean test Dice, and the best method, FedOAP and FedAvg
    against local (points of Dice, paired by seed, 95% CI)."""
    body = []
    for regime in regimes:
        t = Table([r for r in rows if r["regime"] == regime], "main")
        if not t.rows:
            continue
        ranked = sorted(t.variants, key=lambda v: t.mean(v).mean, reverse=True)
        federated = [v for v in ranked if v not in private]
        best = federated[0] if federated else ranked[0]

        body.append(
            [
                md(regime),
                str(len(t.clients)),
                f"{md(best)} {t.mean(best).fmt()}",
                str(len(t.variants)),
                "local is best" if best == "local" else _paired_or_dash(t, best, "local"),
                _paired_or_dash(t, FEDOAP, "local"),
                _paired_or_dash(t, "fedavg", "local"),
            ]
        )
    header = [
        "regime",
        "clients",
        "best method without pooling (mean test Dice)",
        "methods run",
        "best − local (points)",
        "FedOAP − local (points)",
        "FedAvg − local (points)",
    ]
    return [
        "## Regimes",
        "",
        "Differences are of the client-mean test Dice, paired by seed (same splits and initial "
        "weights), mean ± 95% CI over seeds.",
        "",
        *markdown_table(header, body),
        "",
    ]


def privacy_section(rows: list[dict[str, Any]], regimes: list[str], figs: Path) -> list[str]:
    """Regimes that differ in their DP budget: each method's client-mean test Dice per epsilon
    (a regime without DP is epsilon = inf), and each federated method's gain over local, paired
    by seed: does collaboration gain more over training alone under DP than without it?"""
    budget: dict[str, float] = {}
    per_case: dict[str, float] = {}  # regimes under case-level DP-SGD: epsilon per patient
    client_level: dict[str, float] = {}  # regimes under DP-FedAvg instead: its epsilon
    for regime in regimes:
        mine = [r for r in rows if r["regime"] == regime]
        eps = [r["epsilon"] for r in mine if not math.isnan(r["epsilon"])]
        ceps = [r["client_epsilon"] for r in mine if not math.isnan(r["client_epsilon"])]
        if ceps:
            client_level[regime] = float(np.mean(ceps))
        elif eps and any(r.get("dp_unit") == "case" for r in mine):
            per_case[regime] = float(np.mean(eps))
        else:
            budget[regime] = float(np.mean(eps)) if eps else math.inf
    order = sorted(budget, key=lambda g: budget[g])
    extra = [*sorted(per_case, key=lambda g: per_case[g]), *sorted(client_level)]
    cols = [*order, *extra]
    tables = {g: Table([r for r in rows if r["regime"] == g], "main") for g in cols}
    methods = list(dict.fromkeys(v for t in tables.values() for v in t.variants))
    label = {g: "∞ (no DP)" if math.isinf(budget[g]) else f"{budget[g]:.2g}" for g in order}
    header = [f"ε = {label[g]}" for g in order]
    header += [f"{md(g)}: ε = {per_case[g]:.2g} per case" for g in per_case]
    header += [f"{md(g)}: client-level ε = {client_level[g]:.3g}" for g in sorted(client_level)]

    def body_of(key: str) -> list[list[str]]:
        body = [
            [
                md(m),
                *[tables[g].mean(m, key).fmt() if m in tables[g].variants else "-" for g in cols],
            ]
            for m in methods
        ]
        for m in methods:
            if m != "local":
                body.append(
                    [
                        f"{md(m)} − local (points)",
                        *[
                            points(tables[g].paired(m, "local", key))
                            if {m, "local"} <= set(tables[g].variants)
                            else "-"
                            for g in cols
                        ],
                    ]
                )
        return body

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    colors = _colors(methods)
    xs = list(range(len(order)))
    for m in methods:
        stats_ = [tables[g].mean(m) for g in order]
        ax.errorbar(
            xs,
            [s.mean for s in stats_],
            yerr=[s.ci if s.n > 1 else 0.0 for s in stats_],
            marker="o",
            capsize=3,
            color=colors[m],
            label=m,
        )
    ax.set_xticks(xs, [label[g] for g in order])
    ax.set_xlabel("epsilon spent per site (sample-level DP-SGD)")
    ax.set_ylabel("client-mean test Dice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, figs / "dice_vs_epsilon.png", dpi=120)
    plt.close(fig)
    return [
        "## Privacy: test Dice against the DP budget",
        "",
        "Each regime is one budget: the epsilon column is the mean over sites of what each spent "
        "(summary.json `privacy.clients`), at delta = 1/(10 n) per site, per training image; a "
        "`per case` column is case-level DP-SGD (`privacy.dp.unit=case`), whose epsilon holds "
        "for a whole patient or video (n counts cases); a client-level column "
        "is DP-FedAvg's epsilon for a whole site (summary.json `privacy.client_level`; it has no "
        "local run, so no `− local`). Client-mean test Dice, mean ± 95% CI over seeds; the "
        "`− local` rows are paired by seed.",
        "",
        *markdown_table(["method", *header], body_of("test_dice")),
        "",
        "The same by case (patient) Dice: an image-level Dice counts an empty prediction on a "
        "tumour-free slice as a perfect 1, so a model that predicts nothing scores well on a "
        "site with many empty slices (brain MRI) and 0 here.",
        "",
        *markdown_table(["method", *header], body_of("test_case_dice")),
        "",
        "![Dice vs epsilon](figures/dice_vs_epsilon.png)",
        "",
    ]


def make_report(results: Path) -> Path:
    """Write ``results/REPORT.md`` and ``results/figures/`` from ``results/results.csv`` (and
    ``cases.csv`` where there is one); returns REPORT.md's path."""
    # A name is drawn as it is: a "$" in one is text, never the start of matplotlib's mathtext,
    # whose parser raises on a client named "$\frac{$".
    with plt.rc_context({"text.parse_math": False}):
        return _make_report(results)


def _make_report(results: Path) -> Path:
    figs = results / "figures"
    # REPORT.md and figures/ go into RESULTS: refuse a file, or a folder that cannot be written,
    # before reading anything.
    check_output_dir(results, option="RESULTS")
    check_output_dir(figs, option="RESULTS")
    # Both files are read and checked (scores, names) before anything is written.
    rows = load_rows(results / "results.csv")
    cases = read_cases(results)
    figs.mkdir(exist_ok=True)
    private = privacy_breaking(rows)
    lines: list[str] = [
        "# Benchmark report",
        "",
        f"Generated by `fedoap report {results}` from `results.csv` "
        f"({len(rows)} rows). Test Dice is per image; mean ± 95% CI over seeds "
        "(t-interval); the mean column averages the clients within each seed first. Models are "
        "selected per client on validation; the test split is read once per run.",
        "",
    ]
    # One row per (cell, client) carries the cell's wall time: count each cell once.
    cell_seconds = {
        (r["regime"], r["kind"], r["method"], r["config_digest"], r["seed"]): r["seconds_total"]
        for r in rows
        if not math.isnan(r["seconds_total"])
    }
    lines += [
        f"Compute: {len(cell_seconds)} cells, {sum(cell_seconds.values()) / 3600:.1f} h of cell "
        "wall time in total (each cell's federated run, training and validation; leave-one-out "
        "adaptation time not included; cells that ran at the same time (`fedoap bench --jobs`) "
        "shared the machine, and each one's wall time includes that contention).",
        "",
    ]
    lines += cost_lines(rows)
    regimes = sorted({r["regime"] for r in rows})
    if regimes == [""]:
        lines += patient_sections(cases, rows, figs)
        lines += sections(results, rows, "", private)
    else:
        lines += regimes_summary(rows, regimes, private)
        if any(not math.isnan(r["epsilon"]) for r in rows):
            lines += privacy_section(rows, regimes, figs)
        lines += patient_sections(cases, rows, figs)
        for regime in regimes:
            lines += [f"# Regime: {md(regime)}", ""]
            lines += sections(results, [r for r in rows if r["regime"] == regime], regime, private)
    out = results / "REPORT.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def main_table(t: Table, private: set[str]) -> list[str]:
    header = [
        "method",
        "seeds",
        *map(md, t.clients),
        "mean",
        "worst client",
        "HD95 px (mean)",
        "MB/round",
        "s/round",
    ]
    body = []
    order = sorted(t.variants, key=lambda v: t.mean(v).mean, reverse=True)
    for v in order:
        name = (
            f"**{v}**"
            if v == FEDOAP
            else md(v) + (" (pools data: not private)" if v in private else "")
        )
        wc, ws = t.worst(v)
        mb = (t.first(v, "bytes_up_per_round") + t.first(v, "bytes_down_per_round")) / 1e6
        body.append(
            [
                name,
                str(len(t.seeds(v))),
                *[t.cell(v, c).fmt() for c in t.clients],
                t.mean(v).fmt(),
                f"{md(wc)} {ws.mean:.3f}",
                t.mean(v, "test_hd95_px").fmt(1),
                f"{mb:.2f}",
                f"{t.first(v, 'seconds_per_round'):.1f}",
            ]
        )
    out = ["## All methods", "", *markdown_table(header, body), ""]
    if FEDOAP in t.variants:
        out += [
            "### FedOAP's margin over the best baseline on each client",
            "",
            "Best baseline = the federated method (not `centralized`, which pools data) with the "
            "highest mean test Dice on that client.",
            "",
            "| client | best baseline | its Dice | FedOAP | margin (points) |",
            "|---|---|---|---|---|",
        ]
        for c in t.clients:
            b = best_baseline(t, c, private)
            if b is None:
                continue
            mb, mf = t.cell(b, c).mean, t.cell(FEDOAP, c).mean
            out.append(f"| {md(c)} | {md(b)} | {mb:.3f} | {mf:.3f} | {100 * (mf - mb):+.1f} |")
        out.append("")
    return out


def case_table(t: Table, private: set[str]) -> list[str]:
    """Dice per case (patient or video), the unit a clinician reads, next to per-image Dice.

    Per-image Dice scores an empty mask predicted empty as 1 and a single false-positive pixel
    on it as 0, so on clients with many tumour-free slices (brain MRI) it mostly measures
    empty-slice handling. Case Dice pools each case's pixels first: ``2|P∩G| / (|P|+|G|)`` over
    the whole case. Where every image is its own case, the two are equal.
    """
    key = "test_case_dice"
    if all(math.isnan(r.get(key, float("nan"))) for r in t.rows):
        return []
    header = ["method", *map(md, t.clients), "mean"]
    out = [
        "## Case-level Dice",
        "",
        "Dice with each case's (patient's or video's) pixels pooled first. Per-image Dice "
        "scores an empty slice predicted empty as 1 and one false-positive pixel on it as 0, so "
        "on brain MRI, with many tumour-free slices, it largely measures empty-slice handling; "
        "case Dice measures the tumour outline. Where every image is its own case (breast US, "
        "Kvasir) the two are equal.",
        "",
    ]
    body = []
    for v in sorted(t.variants, key=lambda v: t.mean(v, key).mean, reverse=True):
        name = f"**{v}**" if v == FEDOAP else md(v) + (" (not private)" if v in private else "")
        cells = [t.cell(v, c, key).fmt() for c in t.clients]
        body.append([name, *cells, t.mean(v, key).fmt()])
    out += [*markdown_table(header, body), ""]
    if FEDOAP in t.variants and "local" in t.variants:
        d = t.paired(FEDOAP, "local", key)
        out += [
            f"Paired by seed, FedOAP − local in case Dice: {points(d)} points.",
            "",
        ]
    return out


def goals(t: Table, private: set[str]) -> list[str]:
    if FEDOAP not in t.variants:
        return []
    f = t.mean(FEDOAP).mean
    baselines = [v for v in t.variants if v != FEDOAP and v not in private]
    best = best_baseline(t, None, private)
    if best is None:
        return []
    out = ["## The goals, measured", ""]
    ok = f > t.mean(best).mean
    out.append(
        f"- FedOAP's mean Dice above every baseline's: **{'yes' if ok else 'no'}** "
        f"(FedOAP {f:.3f}; best baseline {md(best)} {t.mean(best).mean:.3f})."
    )
    if "local" in t.variants:
        worse = [c for c in t.clients if t.cell(FEDOAP, c).mean <= t.cell("local", c).mean]
        out.append(
            f"- FedOAP above `local` on every client (no negative transfer): "
            f"**{'yes' if not worse else 'no'}**"
            + (f" — not on {', '.join(map(md, worse))}." if worse else ".")
        )
    if "feddp" in t.variants:
        margin = 100 * (f - t.mean("feddp").mean)
        d = t.paired(FEDOAP, "feddp")
        low = 100 * (d.mean - d.ci)
        # Only the paired interval's lower bound can establish the margin; the mean alone
        # cannot, because the seeds' spread is several points.
        if margin < 2.5:
            verdict = "no"
        elif d.n >= 2 and low >= 2.5:
            verdict = "yes"
        else:
            verdict = "on the mean only, not established"
        out.append(
            f"- Margin over FedDP at least +2.5 points: **{verdict}** ({margin:+.1f} points of "
            f"mean Dice; the paired 95% interval's lower bound is {low:+.1f}, see below)."
        )
    hd_f = t.mean(FEDOAP, "test_hd95_px").mean
    # Methods that predicted nothing on some client's test set have no defined mean HD95.
    defined = [v for v in baselines if not math.isnan(t.mean(v, "test_hd95_px").mean)]
    if defined and not math.isnan(hd_f):
        hd_best = min(defined, key=lambda v: t.mean(v, "test_hd95_px").mean)
        hd_b = t.mean(hd_best, "test_hd95_px").mean
        out.append(
            f"- HD95 no worse than the best baseline's: **{'yes' if hd_f <= hd_b else 'no'}** "
            f"(FedOAP {hd_f:.2f} px; best {md(hd_best)} {hd_b:.2f} px; methods with an undefined "
            "mean HD95 on some client are left out)."
        )
    out += [
        "",
        "Paired by seed (every method sees the same splits), FedOAP minus each reference, in "
        "points of mean test Dice (mean ± 95% CI over seeds; an interval that contains 0 is no "
        "evidence either way):",
        "",
    ]
    for ref in dict.fromkeys(v for v in ("local", best, "feddp", "fedavg") if v in t.variants):
        d = t.paired(FEDOAP, ref)
        out.append(f"- FedOAP − {md(ref)}: {points(d)}")
    out.append("")
    return out


def ablation_table(main: Table, ab: Table, figs: Path, rel: str = "figures") -> list[str]:
    # FedOAP's row uses the ablations' seeds only, so every row averages the same seeds.
    seeds = sorted({r["seed"] for r in ab.rows})
    ref = Table(main.rows, "main", seeds)
    header = ["variant", "seeds", *ab.clients, "mean", "Δ vs fedoap (paired)", "HD95 px (mean)"]
    body = []
    srcs = [(ref, FEDOAP)] if FEDOAP in ref.variants else []
    srcs += [(ab, v) for v in ab.variants]
    base = ref.per_seed(FEDOAP) if FEDOAP in ref.variants else {}
    for t, v in srcs:
        # Variant minus FedOAP in points of client-mean Dice, paired by seed (same splits).
        mine = t.per_seed(v)
        d = stat(100 * (mine[k] - base[k]) for k in sorted(set(mine) & set(base)))
        body.append(
            [
                v,
                ",".join(map(str, t.seeds(v))),
                *[t.cell(v, c).fmt() for c in ab.clients],
                t.mean(v).fmt(),
                "–" if v == FEDOAP else d.fmt(1),
                t.mean(v, "test_hd95_px").fmt(1),
            ]
        )
    fig_table(header, body, figs / "ablations.png", "FedOAP ablations: test Dice (mean ± 95% CI)")
    return [
        "## FedOAP ablations (same protocol)",
        "",
        f"Each variant changes one thing in FedOAP's config. Seeds run: {seeds}; the `fedoap` "
        "row is the main matrix's FedOAP on those seeds only. With one seed a cell shows the "
        "value alone (no CI). Δ: the variant minus FedOAP in points of mean Dice, paired by "
        "seed; an interval containing 0 means the component's effect is not measurable here.",
        "",
        *text_table(header, body),
        "",
        f"![ablations]({rel}/ablations.png)",
        "",
    ]


def _loo_cell(t: Table, variant: str, client: str) -> str:
    dice = t.cell(variant, client)
    if dice.n == 0:
        return "not run"
    return f"{dice.fmt()} / {t.cell(variant, client, 'test_hd95_px').fmt(1)}"


def loo_table(t: Table, figs: Path, rel: str = "figures") -> list[str]:
    stages = ("zero_shot", "adapted", "local_only", "local_full")
    methods = list(dict.fromkeys(v.split(":")[0] for v in t.variants))
    header = ["held-out client", "method", *stages]
    body = []
    for c in t.clients:
        for m in methods:
            body.append(
                [
                    c,
                    m,
                    *[_loo_cell(t, f"{m}:{s}", c) for s in stages],
                ]
            )
    fig_table(header, body, figs / "leave_one_out.png", "Leave-one-client-out: test Dice / HD95 px")
    return [
        "## Unseen client (leave-one-client-out)",
        "",
        "Each client in turn is left out; the method federates the other three, then `fedoap "
        "adapt` scores the held-out client zero-shot (final shared weights, personal parts "
        "averaged over the federation's clients), after fine-tuning (epoch chosen on its "
        "validation split), and against models trained from scratch on the same split with "
        "the adaptation's epochs (`local_only`) and with a federation client's whole budget "
        "(`local_full`). Cells: test Dice / HD95 px.",
        "",
        *text_table(header, body),
        "",
        f"![leave-one-out]({rel}/leave_one_out.png)",
        "",
    ]
