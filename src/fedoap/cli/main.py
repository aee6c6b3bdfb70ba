"""The ``fedoap`` command line: every command and its options."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from fedoap.cli.deploy import deploy_app, provision
from fedoap.cli.output import (
    USER_ERRORS,
    console,
    fail,
    fmt,
    print_summary,
    setup_logging,
)
from fedoap.config import ConfigError, TrackingConfig, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # A traceback with locals would print whole image tensors and configs.
    pretty_exceptions_show_locals=False,
    help="Personalised federated tumour segmentation (FedOAP and baselines).",
)


def _show_version(value: bool) -> None:
    if value:
        from fedoap.version import fedoap_version

        console.print(f"fedoap {fedoap_version()}", highlight=False)
        raise typer.Exit()


@app.callback()
def _start(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_show_version,
        is_eager=True,
        help="Show fedoap's version and exit.",
    ),
) -> None:
    setup_logging()


@app.command()
def run(
    overrides: list[str] = typer.Argument(
        None, help="dotted.key=value overrides, e.g. train.lr=3e-4"
    ),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file"),
    out: Path = typer.Option(None, "--out", "-o", help="run folder to create"),
    resume: Path = typer.Option(None, "--resume", help="continue the killed run in this folder"),
    force: bool = typer.Option(
        False, "--force", help="move an existing run folder aside and start over"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train a federation and write a run folder (config.yaml, metrics.csv, summary.json, ...)."""
    from fedoap.fileio import check_output_dir

    try:
        if resume is not None:
            from fedoap.api import resume_experiment

            given = load_config(config, overrides or []) if config is not None else None
            if out is not None and out.resolve() != resume.resolve():
                raise ConfigError(f"--out {out} and --resume {resume} name different folders")
            summary = resume_experiment(resume, given, progress=not quiet)
            run_dir = resume
        else:
            if config is None or out is None:
                raise ConfigError("fedoap run needs -c CONFIG and -o RUN_DIR (or --resume RUN_DIR)")
            check_output_dir(out)  # before the config, the data or torch is loaded
            cfg = load_config(config, overrides or [])  # before torch is imported (seconds)
            from fedoap.api import run_experiment

            summary = run_experiment(cfg, out, force=force, progress=not quiet)
            run_dir = out
    except USER_ERRORS as err:
        fail(err)
        return
    print_summary(summary, f"{summary['method']}: test metrics per client ({run_dir})")


@app.command("config")
def config_cmd(
    overrides: list[str] = typer.Argument(None, help="dotted.key=value overrides"),
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file"),
    clients: bool = typer.Option(False, "--clients", help="print only the client names"),
) -> None:
    """Print the resolved config (validated, defaults filled in) as YAML."""
    try:
        cfg = load_config(config, overrides or [])
    except USER_ERRORS as err:
        fail(err)
        return
    if clients:
        for c in cfg.data.clients:
            typer.echo(c.name)
    else:
        typer.echo(cfg.to_yaml(), nl=False)


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Path = typer.Argument(..., help="a finished run folder"),
    split: str = typer.Option("test", help="split to score: test, val or train"),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda, cuda:N, mps or auto (default: the run's train.device)"
    ),
) -> None:
    """Re-score each client's saved (validation-selected) model."""
    from fedoap.api import evaluate_run

    try:
        out = evaluate_run(run_dir, split, device)
    except USER_ERRORS as err:
        fail(err)
        return
    table = Table(title=f"{run_dir}: {split} split, re-scored from checkpoints/best")
    for col in ("client", "Dice", "IoU", "HD95 px", "case Dice"):
        table.add_column(col)
    for name, m in out["clients"].items():
        table.add_row(
            name, fmt(m["dice"]), fmt(m["iou"]), fmt(m["hd95_px"], 1), fmt(m["case_dice"])
        )
    console.print(table)


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="a finished run folder"),
    images: list[Path] = typer.Argument(
        ...,
        help="image files (PNG/JPG/TIF) or NIfTI volumes (.nii, .nii.gz), folders of them, or "
        "a folder holding one DICOM series",
    ),
    client: str = typer.Option(..., "--client", help="whose personalised model to use"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    force: bool = typer.Option(
        False, "--force", help="replace mask and overlay files that already exist in OUT"
    ),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda, cuda:N, mps or auto (default: the run's train.device)"
    ),
) -> None:
    """Segment images with one client's model: writes <stem>_mask.png and <stem>_overlay.png,
    or <stem>_mask.nii.gz for a NIfTI volume (its shape, affine and header; a client trained on
    a volume source).

    Inputs in several folders keep their paths relative to the folder that holds them all
    (``s1/x.png`` and ``s2/x.png`` give ``OUT/s1/x_mask.png`` and ``OUT/s2/x_mask.png``).
    """
    from fedoap.fileio import check_output_dir

    try:
        check_output_dir(out)  # before torch is imported: a bad --out fails at once
        from fedoap.api import predict_images

        written = predict_images(run_dir, client, images, out, device, force=force)
    except USER_ERRORS as err:
        fail(err)
        return
    for files in written:
        console.print("wrote " + " and ".join(str(f) for f in files))


@app.command()
def adapt(
    run_dir: Path = typer.Argument(..., help="a finished federation's run folder"),
    data: Path = typer.Option(..., "--data", help="the new client's .npz or image folder"),
    name: str = typer.Option(..., "--name", help="a name for the new client"),
    epochs: int = typer.Option(2, "--epochs", help="fine-tuning epochs F"),
    parts: str = typer.Option("all", "--parts", help="personal | all"),
    init: str = typer.Option(
        "averaged",
        "--init",
        help="personal parts: averaged | fresh | nearest (best federation client on validation)",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    force: bool = typer.Option(False, "--force", help="move an existing output folder aside"),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda, cuda:N, mps or auto (default: the run's train.device)"
    ),
) -> None:
    """Adapt a finished federation to a client that was never part of it (zero-shot, fine-tuned,
    and local-from-scratch references)."""
    from fedoap.fileio import check_output_dir

    try:
        check_output_dir(out)  # before torch is imported: a bad --out fails at once
        from fedoap.adapt import adapt as run_adapt
        from fedoap.adapt import write_adapt
        from fedoap.runs import RunDir

        if RunDir(out).is_started() and not force:
            RunDir(out).prepare(force=False)
        summary = run_adapt(run_dir, data, name, epochs, parts, init, device=device)
        write_adapt(summary, out, force)
    except USER_ERRORS as err:
        fail(err)
        return
    table = Table(
        title=f"{summary['method']} -> new client {name} ({parts}, {init} personal parts)"
    )
    for col in ("model", "epochs", "test Dice", "IoU", "HD95 px", "case Dice"):
        table.add_column(col)
    for key in ("zero_shot", "adapted", "local_only", "local_full"):
        t = summary[key]["test"]
        ep = summary[key].get("best_epoch", 0)
        table.add_row(
            key,
            str(ep),
            fmt(t["dice"]),
            fmt(t["iou"]),
            fmt(t["hd95_px"], 1),
            fmt(t["case_dice"]),
        )
    console.print(table)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="a finished run folder"),
    client: str = typer.Option(..., "--client", help="whose selected model to export"),
    out: Path = typer.Option(..., "--out", "-o", help="model file to write, e.g. model.onnx"),
    fmt: str = typer.Option("onnx", "--format", help="onnx (the only format so far)"),
    force: bool = typer.Option(False, "--force", help="replace OUT and OUT.json if they exist"),
) -> None:
    """Export one client's selected model (fp32, CPU) to ONNX, with OUT.json beside it: input
    and output names and shapes, preprocessing, threshold, and the run it came from."""
    from fedoap.export import check_target

    try:
        check_target(out, fmt, force)  # before torch is imported: a bad -o fails at once
        from fedoap.export import export_model

        result = export_model(run_dir, client, out, fmt, force=force)
    except USER_ERRORS as err:
        fail(err)
        return
    info = result.info
    console.print(
        f"wrote {result.model} ({info['bytes'] / 2**20:.2f} MiB, sha256 {info['sha256'][:12]}) "
        f"and {result.sidecar}: {info['method']}, client {client}, best round "
        f"{info['best_round']}; input {info['input']['name']} "
        f"{tuple(info['input']['shape'])}, normalize={info['normalize']}; onnxruntime vs "
        f"PyTorch max |diff| {info['verification']['max_abs_diff']:.1e}",
        highlight=False,
    )


@app.command()
def bench(
    spec: Path = typer.Option(..., "--config", "-c", help="benchmark spec (benchmarks/*.yaml)"),
    out: Path = typer.Option(..., "--out", "-o", help="results folder"),
    methods: list[str] = typer.Option(
        None, "--methods", help="main-matrix methods (default: spec)"
    ),
    seeds: list[int] = typer.Option(None, "--seeds", help="main/ablation seeds (default: spec)"),
    only: list[str] = typer.Option(None, "--only", help="main | ablation | loo | attack"),
    variants: list[str] = typer.Option(
        None,
        "--variants",
        "--variant",
        help="only cells whose variant matches one of these globs, e.g. 'fedoap.median.*'",
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", help="cells run in parallel"),
    max_cells: int = typer.Option(None, "--max-cells", help="run at most this many (chunking)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and stop"),
    track: str = typer.Option(
        None,
        "--track",
        help="mlflow | tensorboard: every cell in one store (OUT/mlflow.db or OUT/tensorboard "
        "unless --tracking-uri), one MLflow run per cell under one run of the benchmark",
    ),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="the store (tracking.uri)"),
    experiment: str = typer.Option(
        None, "--experiment", help="MLflow experiment (default: OUT's name)"
    ),
) -> None:
    """Run the benchmark matrix; finished cells are cached, results.csv is kept current.

    Each of --methods, --seeds, --only and --variants takes several values: --seeds 0 1 2."""
    from fedoap.bench import is_done, load_spec, plan, run_bench, select_variants
    from fedoap.bench.tracking import tracked_config
    from fedoap.fileio import check_output_dir

    try:
        if not dry_run:  # a dry run only reads OUT
            check_output_dir(out)
        bspec, bases = load_spec(spec)
        cells = plan(
            bspec,
            bases,
            methods or None,
            seeds or None,
            only or ("main", "ablation", "loo", "attack"),
        )
        cells = select_variants(cells, variants or [])
        given = None
        if track is not None or tracking_uri is not None or experiment is not None:
            given = _tracking_option(track, tracking_uri, experiment)
        tracking = tracked_config(next(iter(bases.values())), given)
    except USER_ERRORS as err:
        fail(err)
        return
    if dry_run:
        for c in cells:
            console.print(f"{'cached' if is_done(c, out, bspec) else 'todo  '} {c.key}")
        return
    try:
        run_bench(bspec, bases, out, cells, jobs=jobs, max_cells=max_cells, tracking=tracking)
    except USER_ERRORS as err:
        fail(err)


def _tracking_option(track: str | None, uri: str | None, experiment: str | None) -> TrackingConfig:
    """``--track``, ``--tracking-uri`` and ``--experiment`` as a checked tracking section."""
    overrides = [f"tracking.backend={track or 'none'}"]
    overrides += [f"tracking.uri={uri}"] if uri is not None else []
    overrides += [f"tracking.experiment={experiment}"] if experiment is not None else []
    base = ["data.clients=[{name: a, source: synthetic, style: mri}]"]
    return load_config(None, base + overrides).tracking


@app.command()
def report(
    results: Path = typer.Argument(..., help="a benchmark results folder (with results.csv)"),
    analysis: Path | None = typer.Option(
        None,
        "--analysis",
        help="a Python file of a study's own sections (its goals), binding ANALYSIS to a "
        "fedoap.report.Analysis; run as code, so name only a file you trust",
    ),
) -> None:
    """Write REPORT.md and figures/ from results.csv."""
    from fedoap.report import make_report

    try:
        path = make_report(results, analysis)
    except USER_ERRORS as err:
        fail(err)
        return
    console.print(f"wrote {path} and {results / 'figures'}")


data_app = typer.Typer(no_args_is_help=True, help="Client data: preprocess and package it.")
app.add_typer(data_app, name="data")
app.command("provision")(provision)
app.add_typer(deploy_app, name="deploy")


@data_app.command("prepare")
def data_prepare(
    overrides: list[str] = typer.Argument(
        None, help="dotted.key=value overrides, e.g. data.image_size=96"
    ),
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (new or empty)"),
    force: bool = typer.Option(
        False, "--force", help="write into a non-empty folder, replacing files of the same name"
    ),
) -> None:
    """Write each client's letterboxed data to OUT/<client>.npz, and OUT/clients.yaml.

    A compact copy of the preprocessed data to carry to another machine.
    """
    from fedoap.fileio import check_output_dir

    try:
        check_output_dir(out)  # before torch is imported: a bad --out fails at once
        from fedoap.data.prepare import CLIENTS_FILE, prepare_data

        cfg = load_config(config, overrides or [])
        written = prepare_data(cfg.data, out, force=force, config_path=config)
    except (*USER_ERRORS, OSError) as err:
        fail(err)
        return
    for c in written:
        rgb = " (RGB)" if c.use_rgb else ""
        console.print(f"wrote {c.path}: {c.images} images{rgb}, {c.nbytes / 2**20:.1f} MiB")
    total = sum(c.nbytes for c in written) + (out / CLIENTS_FILE).stat().st_size
    console.print(
        f"wrote {out / CLIENTS_FILE}; total {total / 2**20:.1f} MiB ({total:,} bytes) at "
        f"{cfg.data.image_size}x{cfg.data.image_size}"
    )


#: Options that take several values, all in one way: after the option, separated by spaces or
#: commas (``--seeds 0 1 2``, ``--seeds 0,1,2``), or with the option repeated. Click options take
#: one value each, so the first two forms are rewritten to ``--seeds 0 --seeds 1 --seeds 2``.
#: ``--variant`` is the earlier spelling of ``--variants``.
MULTI_VALUE_OPTIONS = ("--methods", "--seeds", "--only", "--variants", "--variant")


def expand_multi_value(argv: list[str]) -> list[str]:
    """``--seeds 0 1 2`` or ``--seeds 0,1,2`` -> ``--seeds 0 --seeds 1 --seeds 2``."""
    out: list[str] = []
    opt: str | None = None  # the multi-value option whose values are being read
    given = False  # whether ``opt`` has received a value yet
    for tok in argv:
        if opt is not None and not tok.startswith("-"):
            for value in filter(None, tok.split(",")):
                out += [opt, value]
                given = True
            continue
        if opt is not None and not given:
            out.append(opt)  # no value followed: leave it for click to report
        opt, given = (tok, False) if tok in MULTI_VALUE_OPTIONS else (None, False)
        if opt is None:
            out.append(tok)
    if opt is not None and not given:
        out.append(opt)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=expand_multi_value(sys.argv[1:] if argv is None else argv), prog_name="fedoap")


if __name__ == "__main__":
    main()
