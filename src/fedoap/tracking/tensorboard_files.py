"""TensorBoard event files as a tracking backend (``torch.utils.tensorboard``, which needs the
``tensorboard`` package): one event folder per run, read by ``tensorboard --logdir``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


class EventFiles:
    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        self.writer = SummaryWriter(log_dir=str(logdir))

    def start(self, run_id: str | None, name: str, parent: str | None) -> str:
        return str(self.logdir)

    def log_params(self, params: Mapping[str, str]) -> None:
        pass  # the config goes in as text (log_text), which TensorBoard shows whole

    def set_tags(self, tags: Mapping[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in tags.items())
        self.writer.add_text("tags", "| tag | value |\n|---|---|\n" + table)
        self.writer.flush()

    def log_scalars(self, scalars: Sequence[tuple[str, int, float]]) -> None:
        for key, step, value in scalars:
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_text(self, name: str, text: str) -> None:
        self.writer.add_text(name, text)
        self.writer.flush()

    def log_files(self, files: Sequence[Path]) -> None:
        pass  # the files stay in the run folder, beside the event files

    def end(self, status: str) -> None:
        self.writer.close()
