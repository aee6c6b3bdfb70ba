"""The report's matplotlib figures (Agg backend). The section modules import this one inside the
functions that draw, so reading and tabulating results never loads matplotlib.

The image grid also needs the data folder named in the cells' configs (images are never stored
with results) and the predicted masks the benchmark kept (``cells/*/examples.npz``); without them
it is skipped with a note.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedoap.fileio import save_figure  # noqa: E402
from fedoap.report.markdown import md  # noqa: E402
from fedoap.report.rows import FEDOAP, Table, num, stat  # noqa: E402


@contextmanager
def names_as_text() -> Iterator[None]:
    """Draw every name as it is: a "$" in one is text, never the start of matplotlib's
    mathtext, whose parser raises on a client named "$\\frac{$"."""
    with plt.rc_context({"text.parse_math": False}):
        yield


def colors(variants: Sequence[str]) -> dict[str, Any]:
    """One colour per variant (tab20), FedOAP's crimson."""
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
    color = colors(t.variants)
    for ax, client in zip(axes, t.clients, strict=True):
        s = [t.cell(v, client, key) for v in order]
        y = np.arange(len(order))
        ax.barh(
            y,
            [x.mean for x in s],
            xerr=[x.ci for x in s],
            color=[color[v] for v in order],
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


def fig_curves(t: Table, path: Path, curves: Sequence[str] | None = None) -> None:
    """Validation Dice per round, one line per variant: ``curves`` (in that order, those that
    ran), or every variant."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    color = colors(t.variants)
    drawn = t.variants if curves is None else [v for v in curves if v in t.variants]
    for v in drawn:
        runs = [
            [num(x) for x in r["val_curve"].split(";")]
            for r in t.rows
            if r["variant"] == v and r.get("val_curve")
        ]
        if not runs:
            continue
        length = min(len(c) for c in runs)
        arr = np.array([c[:length] for c in runs])
        ax.plot(
            np.arange(1, length + 1),
            np.nanmean(arr, 0),
            marker="o",
            ms=3,
            label=v,
            color=color[v],
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
    color = colors(t.variants)
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
            color=color[v],
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
    """Test images with the ground truth and each variant's prediction outlined; returns why
    the grid was skipped, or None."""
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
    outline = {
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
            ax.contour(
                test.y[idx, 0].numpy(), [0.5], colors=outline["ground truth"], linewidths=1.2
            )
            for v, ex in examples.items():
                pred = ex[f"{name}/pred"][j]
                if pred.any():
                    ax.contour(pred.astype(float), [0.5], colors=outline[v], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    handles = [
        plt.Line2D([], [], color=c, label=label)
        for label, c in outline.items()
        if label == "ground truth" or label in examples
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return None


def fig_robustness(
    method: str,
    honest: Mapping[tuple[str, str], Mapping[int, float | None]],
    clean: dict[int, float],
    defences: list[str],
    kinds: list[str],
    path: Path,
) -> None:
    """Grouped bars: the honest sites' mean test Dice per attack (groups) and defence (bars);
    a cross at 0 marks a run that diverged, the dashed line is the clean run."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(kinds)), 3.6))
    width = 0.8 / max(len(defences), 1)
    color = colors(defences)
    for j, d in enumerate(defences):
        for i, kind in enumerate(kinds):
            per = honest.get((d, kind), {})
            x = i + (j - (len(defences) - 1) / 2) * width
            if not per:
                continue
            if any(v is None for v in per.values()):
                ax.plot([x], [0.0], marker="x", color=color[d], markersize=8)
                continue
            s = stat(per.values())  # type: ignore[arg-type]
            ax.bar(
                x,
                s.mean,
                width,
                yerr=s.ci if s.n > 1 else None,
                color=color[d],
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


def fig_dice_vs_epsilon(
    tables: Mapping[str, Table],
    methods: list[str],
    regimes: list[str],
    labels: list[str],
    path: Path,
) -> None:
    """Each method's client-mean test Dice (± 95% CI) against the regimes' DP budgets, in the
    order of ``regimes``, each labelled by its ``labels`` entry."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    color = colors(methods)
    xs = list(range(len(regimes)))
    for m in methods:
        stats_ = [tables[g].mean(m) for g in regimes]
        ax.errorbar(
            xs,
            [s.mean for s in stats_],
            yerr=[s.ci if s.n > 1 else 0.0 for s in stats_],
            marker="o",
            capsize=3,
            color=color[m],
            label=m,
        )
    ax.set_xticks(xs, labels)
    ax.set_xlabel("epsilon spent per site (sample-level DP-SGD)")
    ax.set_ylabel("client-mean test Dice")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
