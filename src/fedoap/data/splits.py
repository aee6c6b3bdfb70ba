"""Patient-level train/val/test splits.

Neighbouring MRI slices of one patient, and neighbouring frames of one colonoscopy video, are
near-duplicates: a slice-level split leaks the test set into training. Splits here are drawn over
unique ``case_ids``; images without case ids are their own case.
"""

from __future__ import annotations

import numpy as np

from fedoap.config import SplitConfig
from fedoap.data.errors import DataError

SPLITS = ("train", "val", "test")


def split_by_case(case_ids: np.ndarray, cfg: SplitConfig, where: str = "") -> dict[str, np.ndarray]:
    """Indices of each split; every case lands in exactly one split. Deterministic in cfg.seed.

    ``where`` (the client, its file) starts error messages.
    """
    prefix = f"{where}: " if where else ""
    cases = np.unique(case_ids)  # sorted, so the split does not depend on file order
    n = len(cases)
    if n < 3:
        raise DataError(f"{prefix}{n} case(s) cannot be split into train/val/test (need >= 3)")
    perm = np.random.default_rng(cfg.seed).permutation(n)
    n_val = max(1, round(cfg.val * n))
    n_test = max(1, round(cfg.test * n))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"{prefix}{n} cases leave no training case with split {cfg}")
    groups = {
        "train": cases[perm[:n_train]],
        "val": cases[perm[n_train : n_train + n_val]],
        "test": cases[perm[n_train + n_val :]],
    }
    return {k: np.flatnonzero(np.isin(case_ids, v)) for k, v in groups.items()}


def first_cases(idx: np.ndarray, case_ids: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """The images of ``k`` cases of ``idx``, drawn with ``seed`` (all of them when ``k`` is None
    or covers every case).

    The cases are shuffled once and the first ``k`` kept, so the draws are nested: the cases
    kept at k are among those kept at any larger k (a data-size axis varies one thing)."""
    cases = np.unique(case_ids[idx])  # sorted: independent of file order
    if k is None or k >= len(cases):
        return idx
    order = np.random.default_rng(seed).permutation(len(cases))
    keep = cases[order[:k]]
    return idx[np.isin(case_ids[idx], keep)]


def cap_images(idx: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """A random subset of at most ``cap`` image indices (sorted)."""
    if cap is None or len(idx) <= cap:
        return idx
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(idx, cap, replace=False))


def cap_cases(idx: np.ndarray, case_ids: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """Whole cases, in random order, until ``cap`` images (at least one case is kept).

    Used for val/test, so that per-case metrics are computed on complete cases.
    """
    if cap is None or len(idx) <= cap:
        return idx
    cases = np.unique(case_ids[idx])
    order = np.random.default_rng(seed).permutation(len(cases))
    keep: list[np.ndarray] = []
    total = 0
    for i in order:
        members = idx[case_ids[idx] == cases[i]]
        if keep and total + len(members) > cap:
            continue
        keep.append(members)
        total += len(members)
    return np.sort(np.concatenate(keep))
