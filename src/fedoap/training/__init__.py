"""The local training and evaluation loops that every algorithm and runtime shares."""

from fedoap.training.engine import (
    autocast,
    evaluate,
    make_generator,
    predict_logits,
    threads,
    train_epochs,
)

__all__ = ["autocast", "evaluate", "make_generator", "predict_logits", "threads", "train_epochs"]
