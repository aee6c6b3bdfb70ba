"""Python entry points behind the CLI: run, resume, evaluate and predict."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedoap.algorithms import KV, Algorithm, build_algorithm
from fedoap.config import Config, ConfigError, load_config, save_config
from fedoap.data import prepare_clients
from fedoap.data.dataset import SPLITS, ClientData
from fedoap.data.sources import read_image
from fedoap.data.transforms import letterbox, normalize, unletterbox
from fedoap.errors import NotFoundError
from fedoap.federation.runner import Runner
from fedoap.federation.state import load_selected, runtime_of
from fedoap.fileio import atomic_write_bytes, check_output_dir, mirrored_outputs
from fedoap.models import FedOAPNet
from fedoap.runs import RunDir
from fedoap.training import evaluate, predict_logits
from fedoap.training.device import oom_guard, place, session, setup


def run_experiment(
    cfg: Config,
    run_dir: Path,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    clients: list[ClientData] | None = None,
) -> dict[str, Any]:
    """Validate everything, then train a new run in ``run_dir``; returns ``summary.json``."""
    algorithm = build_algorithm(cfg)  # unknown method / options fail here, before data is read
    setup(cfg.train)  # so does a device that is not there
    if cfg.federation.runtime == "flower-sim":
        check_flower(cfg, algorithm)
    t0 = time.perf_counter()
    if clients is None:
        clients = prepare_clients(cfg.data)  # bad data fails here, before the folder is touched
    data_seconds = time.perf_counter() - t0
    rd = RunDir(run_dir)
    if rd.is_started() and not force:
        rd.prepare(force=False)  # raises RunExistsError with the standard message
    for c in clients:
        for note in c.notes:
            log(f"note: {note}")
    moved = rd.prepare(force=force)
    if moved is not None:
        log(f"moved the existing run folder to {moved}")
    save_config(cfg, rd.config)
    rd.write_json(
        rd.splits,
        {c.name: {s: c.split(s).names.tolist() for s in ("train", "val", "test")} for c in clients},
    )
    if cfg.federation.runtime == "flower-sim":
        return run_on_flower_simulation(cfg, rd, log)
    runner = Runner(
        cfg, algorithm, clients, rd, progress=progress, log=log, data_seconds=data_seconds
    )
    return runner.run()


def check_flower(cfg: Config, algorithm: Algorithm) -> None:
    """Fail early, with a reason, if a run cannot use the Flower runtime."""
    try:
        from fedoap.federation.flower import unsupported_reason
    except ImportError as err:
        raise ConfigError(
            f"federation.runtime=flower-sim needs Flower: pip install -e '.[flower]' ({err})"
        ) from None
    reason = unsupported_reason(algorithm)
    if reason:
        raise ConfigError(f"method {cfg.method} cannot run on Flower: {reason}")


def run_on_flower_simulation(
    cfg: Config, rd: RunDir, log: Callable[[str], None], resume: bool = False
) -> dict[str, Any]:
    """The same run through Flower's simulation engine; it writes the same run folder."""
    from fedoap.federation.flower_launch import run_simulation

    run = run_simulation(rd.root, len(cfg.data.clients), log=log, resume=resume)
    summary = dict(json.loads(rd.summary.read_text()))
    summary["flower"] = {k: run.get(k) for k in ("run-id", "status", "elapsed", "network-traffic")}
    rd.write_json(rd.summary, summary)
    return summary


def resume_experiment(
    run_dir: Path,
    overrides_cfg: Config | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Continue a killed run from ``checkpoints/last.safetensors``."""
    rd = RunDir(run_dir)
    if not rd.config.is_file():
        raise NotFoundError(f"{rd.config} not found: {run_dir} is not a run folder")
    cfg = load_config(rd.config)
    if overrides_cfg is not None and overrides_cfg.digest() != cfg.digest():
        raise ConfigError(
            f"the config given differs from {rd.config}; resume uses the run's own config "
            "(start a new run folder to change it)"
        )
    if rd.is_complete():
        log(f"{run_dir} is already complete; nothing to resume")
        return dict(json.loads(rd.summary.read_text()))
    if cfg.federation.runtime == "flower-sim" or runtime_of(rd) == "flower":
        if cfg.federation.runtime != "flower-sim":
            raise ConfigError(
                f"{run_dir} was run on a Flower deployment: resume it there, with flwr run "
                "... --run-config \"run-dir='...' resume='true'\" (docs/flower.md); the sites "
                "continue from their own folders"
            )
        check_flower(cfg, build_algorithm(cfg))
        log(f"resuming the Flower simulation in {run_dir} from its server checkpoint")
        return run_on_flower_simulation(cfg, rd, log, resume=True)
    algorithm = build_algorithm(cfg)
    setup(cfg.train)
    t0 = time.perf_counter()
    clients = prepare_clients(cfg.data)
    data_seconds = time.perf_counter() - t0
    runner = Runner(
        cfg, algorithm, clients, rd, progress=progress, log=log, data_seconds=data_seconds
    )
    if rd.last.is_file():
        runner.restore()
        stage, done = runner.position
        log(f"resuming {run_dir} after {stage} step {done}")
    else:
        log(f"no checkpoint in {rd.checkpoints}; starting {run_dir} from round 1")
    return runner.run()


def run_config(run_dir: Path, device: str | None = None) -> Config:
    """A run folder's config, with ``train.device`` replaced by ``device`` when given (score a
    model trained on a GPU on a laptop: ``--device cpu``)."""
    return load_config(RunDir(run_dir).config, [f"train.device={device}"] if device else [])


def load_client_model(
    run_dir: Path, client: str, device: torch.device | None = None
) -> tuple[Config, FedOAPNet]:
    """Rebuild a client's selected model from a run folder (weights and K/V bank), on
    ``device`` (default: the run config's ``train.device``, resolved on this machine)."""
    rd = RunDir(run_dir)
    cfg = load_config(rd.config)
    names = [c.name for c in cfg.data.clients]
    if client not in names:
        raise ConfigError(f"client {client!r} is not in {rd.config}; clients: {', '.join(names)}")
    why = rd.excluded().get(client)
    if why is not None:
        raise ConfigError(
            f"client {client!r} was excluded from {rd.root}: its training diverged in round "
            f"{why['round']} ({why['stage']}), so it has no model"
        )
    device = device if device is not None else setup(cfg.train)
    model = build_algorithm(cfg).build_model()
    weights, kv = load_selected(rd, client)
    model.load_state_dict(weights)
    place(model, cfg.train, device, compile=False)  # scoring only: not worth compiling
    model.set_kv_bank(kv.get(KV + "bank"))
    return cfg, model


def evaluate_run(run_dir: Path, split: str = "test", device: str | None = None) -> dict[str, Any]:
    """Re-score every client's saved model on a split; writes ``evaluation.json``."""
    rd = RunDir(run_dir)
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = run_config(run_dir, device)
    with session(cfg.train) as dev, oom_guard(cfg.train, cfg.data.image_size, dev):
        return _evaluate_run(rd, cfg, split, dev)


def _evaluate_run(rd: RunDir, cfg: Config, split: str, device: torch.device) -> dict[str, Any]:
    clients = prepare_clients(cfg.data)
    t = cfg.train
    excluded = rd.excluded()
    out: dict[str, Any] = {"split": split, "clients": {}}
    if excluded:
        out["excluded"] = excluded  # diverged during the run: no model to score
    for c in clients:
        if c.name in excluded:
            continue
        _, model = load_client_model(rd.root, c.name, device)
        data = c.split(split).to(device)
        out["clients"][c.name] = evaluate(
            model, data, t.precision, full=True, batch_size=t.eval_batch_size
        )
    dice = [v["dice"] for v in out["clients"].values()]
    out["mean"] = {"dice": float(np.mean(dice))}
    rd.write_json(rd.root / f"evaluation_{split}.json", out)
    return out


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB uint8: the image in gray, the mask tinted red with a bright outline."""
    img = image.astype(np.float32)
    if img.ndim == 3:
        img = img.mean(-1)
    lo, hi = float(img.min()), float(img.max())
    g = (img - lo) / (hi - lo + 1e-6) * 255
    rgb = np.stack([g, g, g], -1)
    m = mask.astype(bool)
    rgb[m] = 0.6 * rgb[m] + 0.4 * np.array([255, 0, 0])
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    edge = torch.nn.functional.max_pool2d(t, 3, 1, 1) - (
        -torch.nn.functional.max_pool2d(-t, 3, 1, 1)
    )
    rgb[edge[0, 0].numpy() > 0] = (255, 255, 0)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def predict_images(
    run_dir: Path,
    client: str,
    images: Sequence[Path],
    out_dir: Path,
    device: str | None = None,
    force: bool = False,
) -> list[tuple[Path, Path]]:
    """Write ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png`` for each image.

    Images in one folder give flat outputs in ``out_dir``; images in several keep their folders
    relative to the deepest folder holding them all (``s1/x.png``, ``s2/x.png`` ->
    ``out_dir/s1/x_mask.png``, ``out_dir/s2/x_mask.png``). Raises
    :class:`~fedoap.errors.OutputError` before reading anything if ``out_dir`` cannot be used,
    two images would write the same file, an output would replace an input, or an output exists
    and ``force`` is off. Every image is read and checked before any output is written.
    """
    check_output_dir(out_dir)
    targets = mirrored_outputs(images, out_dir, ("_mask.png", "_overlay.png"), force)
    cfg = run_config(run_dir, device)
    with session(cfg.train) as dev, oom_guard(cfg.train, cfg.data.image_size, dev):
        return _predict_images(run_dir, client, images, targets, dev)


def _predict_images(
    run_dir: Path,
    client: str,
    images: Sequence[Path],
    targets: Sequence[tuple[Path, ...]],
    device: torch.device,
) -> list[tuple[Path, Path]]:
    cfg, model = load_client_model(run_dir, client, device)
    spec = next(c for c in cfg.data.clients if c.name == client)
    arrays = [
        read_image(Path(p), cfg.data.channels, spec.channel, max_pixels=cfg.data.max_image_pixels)
        for p in images
    ]

    def save_png(path: Path, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())  # --force: the old file or the new, never torn

    written = []
    for arr, (mpath, opath) in zip(arrays, targets, strict=True):
        h, w = arr.shape[:2]
        boxed = letterbox(arr, cfg.data.image_size, is_mask=False)
        x = normalize(boxed[None], cfg.data.normalize).to(device)
        logits = predict_logits(model, x, cfg.train.precision)
        pred = (logits[0, 0] > 0).cpu().numpy().astype(np.uint8)
        mask = unletterbox(pred, h, w, is_mask=True)
        mpath.parent.mkdir(parents=True, exist_ok=True)
        save_png(mpath, mask * 255)
        save_png(opath, overlay(arr, mask))
        written.append((mpath, opath))
    return written
