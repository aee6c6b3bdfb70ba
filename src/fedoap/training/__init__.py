"""The local training and evaluation loops that every algorithm and runtime shares."""

from fedoap.training.device import autocast
from fedoap.training.engine import (
    evaluate,
    make_generator,
    predict_logits,
    train_epochs,
)

__all__ = ["autocast", "evaluate", "make_generator", "predict_logits", "train_epochs"]
