"""Training losses: the segmentation loss and FedOAP's perturbed boundary loss."""

from fedoap.losses.pbl import PerturbedBoundaryLoss, perturbation_region
from fedoap.losses.seg import SegLoss

__all__ = ["PerturbedBoundaryLoss", "SegLoss", "perturbation_region"]
