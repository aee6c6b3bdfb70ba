"""Python entry points behind the CLI: run, resume, evaluate and predict."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fedoap.aggregation import build_aggregation
from fedoap.algorithms import build_algorithm
from fedoap.basetypes import KV
from fedoap.config import (
    VOLUME_SOURCES,
    ClientSpec,
    Config,
    ConfigError,
    load_config,
    save_config,
)
from fedoap.data import prepare_clients
from fedoap.data.dataset import SPLITS, ClientData, resolve_path
from fedoap.data.sources import IMAGE_EXTENSIONS, read_image
from fedoap.data.transforms import letterbox, normalize, unletterbox
from fedoap.data.volumes import (
    Volume,
    VolumeInput,
    check_input_channel,
    image_3d,
    is_other_channel,
    nifti_stem,
    prepare_volume,
    read_volume,
    restore_slices,
    volume_input,
    write_mask,
)
from fedoap.errors import CheckpointError, NotFoundError
from fedoap.federation.runtimes import runtime_for
from fedoap.federation.state import load_selected, runtime_of
from fedoap.fileio import atomic_write_bytes, check_output_dir, mirrored_outputs
from fedoap.models import FedOAPNet
from fedoap.runs import RunDir
from fedoap.tracking import check_tracking
from fedoap.training import evaluate, predict_logits
from fedoap.training.device import oom_guard, place, resolve_precision, session, setup

logger = logging.getLogger(__name__)


def run_experiment(
    cfg: Config,
    run_dir: Path,
    force: bool = False,
    progress: bool = True,
    clients: list[ClientData] | None = None,
) -> dict[str, Any]:
    """Validate everything, then train a new run in ``run_dir``; returns ``summary.json``."""
    cfg = resolve_precision(cfg)  # the run records, and is identified by, what it runs in
    algorithm = build_algorithm(cfg)  # unknown method / options fail here, before data is read
    build_aggregation(cfg)  # so does an unknown aggregation rule
    setup(cfg.train)  # so does a device that is not there
    runtime = runtime_for(cfg, algorithm)  # and a method the runtime cannot run
    check_tracking(cfg.tracking)  # and a tracking backend that is not installed
    t0 = time.perf_counter()
    if clients is None:
        clients = prepare_clients(cfg.data)  # bad data fails here, before the folder is touched
    data_seconds = time.perf_counter() - t0
    if cfg.privacy.dp.enabled:  # so does a site DP-SGD cannot sample, or a budget out of reach
        for c in clients:
            algorithm.trainer.site_dp(c.name, c.train.case_ids)
    rd = RunDir(run_dir)
    if rd.is_started() and not force:
        rd.prepare(force=False)  # raises RunExistsError with the standard message
    for c in clients:
        for note in c.notes:
            logger.info(f"note: {note}")
    with rd.lock(create=True):  # held for the whole run: a second process is refused
        moved = rd.prepare(force=force)
        if moved is not None:
            logger.info(f"moved the existing run folder to {moved}")
        save_config(cfg, rd.config)
        splits = ("train", "val", "test")
        rd.write_json(
            rd.splits, {c.name: {s: c.split(s).names.tolist() for s in splits} for c in clients}
        )
        return runtime.run(cfg, algorithm, clients, rd, progress, data_seconds)


def resume_experiment(
    run_dir: Path,
    overrides_cfg: Config | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Continue a killed run from ``checkpoints/last.safetensors``."""
    rd = RunDir(run_dir)
    if not rd.config.is_file():
        raise NotFoundError(f"{rd.config} not found: {run_dir} is not a run folder")
    with rd.lock():  # a run still going is refused before anything is read or written
        return _resume(rd, overrides_cfg, progress)


def _resume(rd: RunDir, overrides_cfg: Config | None, progress: bool) -> dict[str, Any]:
    run_dir = rd.root
    cfg = load_config(rd.config)
    if overrides_cfg is not None and overrides_cfg.digest() != cfg.digest():
        raise ConfigError(
            f"the config given differs from {rd.config}; resume uses the run's own config "
            "(start a new run folder to change it)"
        )
    if rd.is_complete():
        logger.info(f"{run_dir} is already complete; nothing to resume")
        return dict(json.loads(rd.summary.read_text()))
    if runtime_of(rd) == "flower" and cfg.federation.runtime != "flower-sim":
        raise ConfigError(
            f"{run_dir} was run on a Flower deployment: resume it there, with flwr run "
            "... --run-config \"run-dir='...' resume='true'\" (docs/flower.md); the sites "
            "continue from their own folders"
        )
    algorithm = build_algorithm(cfg)
    setup(cfg.train)
    check_tracking(cfg.tracking)
    return runtime_for(cfg, algorithm).resume(cfg, algorithm, rd, progress)


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
    weights, kv = load_selected(rd, client, cfg.digest())
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # a file of another architecture (older than its digest check)
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"{rd.best(client)}: its weights do not fit the model of {rd.config} ({first})"
        ) from None
    place(model, cfg.train, device, compile=False)  # scoring only: not worth compiling
    model.set_kv_bank(kv.get(KV + "bank"))
    return cfg, model


def evaluate_run(run_dir: Path, split: str = "test", device: str | None = None) -> dict[str, Any]:
    """Re-score every client's saved model on a split; writes ``evaluation.json``."""
    rd = RunDir(run_dir)
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    cfg = run_config(run_dir, device)
    # It writes evaluation_<split>.json into the run folder: not while another process runs it.
    with rd.lock(), session(cfg.train) as dev, oom_guard(cfg.train, cfg.data.image_size, dev):
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
) -> list[tuple[Path, ...]]:
    """Segment 2D images or 3D volumes with one client's selected model.

    A folder among ``images`` stands for the image or NIfTI files under it. 2D images give
    ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png``; NIfTI volumes (``.nii``, ``.nii.gz``,
    for a client trained on a volume source) give ``<stem>_mask.nii.gz`` with the input's shape,
    affine and header. Images in one folder give flat outputs in ``out_dir``; images in several
    keep their folders relative to the deepest folder holding them all (``s1/x.png``,
    ``s2/x.png`` -> ``out_dir/s1/x_mask.png``, ``out_dir/s2/x_mask.png``). Raises
    :class:`~fedoap.errors.OutputError` before reading anything if ``out_dir`` cannot be used,
    two images would write the same file, an output would replace an input, or an output exists
    and ``force`` is off. Every input is read and checked before any output is written.
    """
    check_output_dir(out_dir)
    cfg = run_config(run_dir, device)
    spec = _client_spec(cfg, client)
    how = None
    if spec.source in VOLUME_SOURCES:
        how = volume_input(spec, resolve_path(cfg.data.root, spec.path or ""))
    files = expand_inputs(images, how)
    volumes = [nifti_stem(p) is not None or p.is_dir() for p in files]  # a dir: a DICOM series
    if any(volumes) and not all(volumes):
        raise ConfigError(
            "predict takes 2D images or NIfTI volumes, not both in one command: "
            f"{files[volumes.index(True)]} and {files[volumes.index(False)]}"
        )
    suffixes = ("_mask.nii.gz",) if all(volumes) else ("_mask.png", "_overlay.png")
    targets = mirrored_outputs(files, out_dir, suffixes, force)
    with session(cfg.train) as dev, oom_guard(cfg.train, cfg.data.image_size, dev):
        if all(volumes):
            if how is None:
                raise ConfigError(
                    f"client {client!r} was trained on 2D images (source={spec.source}); NIfTI "
                    "volumes need a client trained on a volume source (nnunet, msd, volumes)"
                )
            return _predict_volumes(run_dir, client, files, targets, how, dev)
        if how is not None:
            raise ConfigError(
                f"client {client!r} was trained on 3D volumes (source={spec.source}), normalised "
                "per volume; give it NIfTI volumes, not 2D images"
            )
        return _predict_images(run_dir, client, files, targets, dev)


def expand_inputs(paths: Sequence[Path], how: VolumeInput | None = None) -> list[Path]:
    """Files to predict: each file as given, each folder as the image or NIfTI files under it,
    or as itself when it holds a DICOM series.

    For a client trained on an nnU-Net dataset, a folder's files of its other channels
    (``<case>_0001.nii.gz`` beside the model's ``<case>_0000.nii.gz``) are left out: nnU-Net's
    ``imagesTs`` holds every channel.
    """
    from fedoap.data.dicom import is_dicom_series

    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir() or is_dicom_series(p):
            out.append(p)
            continue
        found = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and not f.name.startswith(".")
            and (f.suffix.lower() in IMAGE_EXTENSIONS or nifti_stem(f) is not None)
            and not (how is not None and is_other_channel(f, how))
        )
        if not found:
            raise NotFoundError(f"{p}: no images or NIfTI volumes in this folder")
        out.extend(found)
    return out


def _client_spec(cfg: Config, client: str) -> ClientSpec:
    for c in cfg.data.clients:
        if c.name == client:
            return c
    names = ", ".join(c.name for c in cfg.data.clients)
    raise ConfigError(f"client {client!r} is not in the run's config; clients: {names}")


def _predict_images(
    run_dir: Path,
    client: str,
    images: Sequence[Path],
    targets: Sequence[tuple[Path, ...]],
    device: torch.device,
) -> list[tuple[Path, ...]]:
    cfg, model = load_client_model(run_dir, client, device)
    spec = _client_spec(cfg, client)
    assert not isinstance(spec.channel, str)  # config validation: names need a volume source

    def read(p: Path) -> np.ndarray:
        return read_image(p, cfg.data.channels, spec.channel, max_pixels=cfg.data.max_image_pixels)

    # Every input decodes before any output is written, one at a time (each header is checked
    # before its pixels): twenty large images never have to fit in memory at once.
    for p in images:
        read(Path(p))

    def save_png(path: Path, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())  # --force: the old file or the new, never torn

    written: list[tuple[Path, ...]] = []
    for p, (mpath, opath) in zip(images, targets, strict=True):
        arr = read(Path(p))
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


def predict_volume(
    model: torch.nn.Module, cfg: Config, spec: ClientSpec, vol: Volume, how: VolumeInput
) -> np.ndarray:
    """One volume's tumour mask (uint8 {0, 1}, the volume's 3D shape) from a client's model.

    The volume goes through the training pipeline's own steps (:mod:`fedoap.data.volumes`):
    channel, per-volume normalisation, slices along the same axis rule, letterboxing. Slices are
    predicted in batches of ``train.eval_batch_size`` and the letterboxing is undone.
    """
    where = f"{vol.path}"
    image = image_3d(vol, how.channel_index, where)
    prepared = prepare_volume(image, vol.zooms, how.kind, spec.volume, cfg.data.image_size, where)
    slices = prepared.slices
    if cfg.data.channels == 3:  # gray slices, repeated as training repeats them
        slices = np.repeat(slices[..., None], 3, axis=-1)
    device = next(model.parameters()).device
    x = normalize(slices, "unit").to(device)
    logits = predict_logits(model, x, cfg.train.precision, cfg.train.eval_batch_size)
    pred = (logits[:, 0] > 0).cpu().numpy().astype(np.uint8)
    return restore_slices(pred, prepared)


def _read_input_volume(path: Path, max_pixels: int, max_voxels: int) -> Volume:
    """A NIfTI file, or a DICOM series folder, as a volume."""
    if path.is_dir():
        from fedoap.data.dicom import read_dicom_series

        return read_dicom_series(path, max_pixels, max_voxels)
    return read_volume(path, max_pixels, max_voxels)


def _predict_volumes(
    run_dir: Path,
    client: str,
    files: Sequence[Path],
    targets: Sequence[tuple[Path, ...]],
    how: VolumeInput,
    device: torch.device,
) -> list[tuple[Path, ...]]:
    cfg, model = load_client_model(run_dir, client, device)
    spec = _client_spec(cfg, client)
    limit = (cfg.data.max_image_pixels, cfg.data.max_volume_voxels)
    # Every volume is read and checked before any mask is written; one at a time, so a folder
    # of CT volumes never has to fit in memory at once.
    for p in files:
        check_input_channel(p, how)
        image_3d(_read_input_volume(p, *limit), how.channel_index, str(p))
    written: list[tuple[Path, ...]] = []
    for p, (mpath,) in zip(files, targets, strict=True):
        vol = _read_input_volume(p, *limit)
        mask = predict_volume(model, cfg, spec, vol, how)
        mpath.parent.mkdir(parents=True, exist_ok=True)
        write_mask(mpath, mask, vol)
        written.append((mpath,))
    return written
