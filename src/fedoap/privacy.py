"""Differential privacy: what each mechanism promises, and its accounting (``privacy`` config).

**Sample-level DP-SGD at each site** (``privacy.dp``; Abadi et al. 2016, with Opacus):

- Each step draws its batch by *Poisson sampling*: every training image is taken with
  probability ``q = B / n`` (``B`` = ``train.batch_size``, ``n`` the site's training images),
  and an epoch is ``round(n / B)`` steps. The accountant's guarantee assumes this sampling.
- Each example's gradient (Opacus's per-sample gradients; ``tests/test_dp.py`` holds them equal
  to a loop over single examples for every layer) is clipped to ``max_grad_norm``; the sum gets
  Gaussian noise of std ``noise_multiplier * max_grad_norm`` and is divided by ``B``.
- The training loss must be a mean of per-example terms, so under DP the soft Dice is per image
  (``SegLoss(per_image=True)``), not summed over the batch as without DP.
- The budget covers every step the site takes: each federated round's local epochs and each
  fine-tuning epoch (:func:`planned_epochs`). With a target ``epsilon`` the noise multiplier is
  the smallest that spends at most that over the planned steps (Opacus's
  ``get_noise_multiplier``); the epsilon actually spent, over the steps actually taken, is what
  ``summary.json`` reports (``privacy.clients.<name>``).
- ``delta`` defaults to ``1 / (10 n)`` per site.
- What it protects: one patient's image at one site, against anyone who sees what the site
  sends or the models it keeps, *if* every image is one patient. Several slices of one patient
  are several examples, so a patient with k slices has the guarantee of group privacy:
  roughly ``k * epsilon`` (and a larger delta); case-level DP-SGD (below) protects the patient
  directly. Validation and test images are not used for
  training steps but do decide model selection, which is not accounted (the selection reads a
  few numbers, once per round; a strict accounting would add it).
- **Case-level DP-SGD** (``privacy.dp.unit: case``): the unit is a case (a patient or a
  video) with all its training images. Each step takes every case with probability
  ``q = B / n`` (``n`` the site's training cases; ``train.batch_size`` counts cases) and all its
  images; each case's gradient (of the mean loss over its images) is clipped as one, and
  ``delta`` defaults to ``1 / (10 n)`` over cases. The guarantee is then per patient or video
  directly, with no group-privacy factor. Where every case is one image (breast ultrasound,
  Kvasir) it is the sample-level mechanism, and the same model bit for bit.
- The noise comes from a seeded generator (runs are reproducible and resume exactly); it is
  not a cryptographically secure source, as a production deployment would need (Opacus's
  ``secure_mode``).

**Client-level DP** (``privacy.client_dp``; DP-FedAvg, McMahan et al. 2018): the server clips
each site's update of the shared weights to ``clip_norm``, averages them with equal weights and
adds Gaussian noise of std ``noise_multiplier * clip_norm / K`` to the mean. Every site takes
part in every round (sampling rate 1), so the RDP accountant composes ``rounds`` Gaussian
mechanisms; ``delta`` defaults to ``1 / (10 K)``. It protects a whole site's data in what the
*global* model reveals, against anyone who sees the global models; it assumes a trusted server
(the server sees each update before noising: see docs/privacy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedoap.basetypes import StateDict
from fedoap.config import Config, ConfigError

#: The server-state key counting DP-FedAvg's noised rounds (its accountant's steps).
CLIENT_DP_ROUNDS = "privacy.client_dp_rounds"
#: The client-state key (``ClientState.extra``) counting a site's DP-SGD steps (its ledger).
DP_STEPS = "privacy.dp_steps"


@dataclass(frozen=True)
class SiteDP:
    """One site's DP-SGD parameters, fixed before its first step."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # q = B / n (n: the site's training units)
    steps_per_epoch: int  # round(n / B)
    expected_batch: int  # B
    delta: float
    accountant: str
    planned_steps: int
    target_epsilon: float | None
    unit: str = "image"  # or "case": what one sampled, clipped row is (privacy.dp.unit)

    def epsilon(self, steps: int) -> float:
        """The epsilon spent after ``steps`` steps (at this site's delta)."""
        return epsilon_spent(
            self.accountant, self.noise_multiplier, self.sample_rate, steps, self.delta
        )

    def report(self, steps: int, images_per_case: int = 1) -> dict[str, Any]:
        """``summary.json``'s ``privacy.clients.<name>``; ``images_per_case``, the most training
        images one case (patient or video) holds at the site, gives its ``patient_level``
        guarantee: by group privacy per image, or the budget itself per case."""
        eps = self.epsilon(steps)
        if self.unit == "case":
            patient = {
                "max_images_per_case": images_per_case,
                "epsilon": round(eps, 4),
                "delta": self.delta,
                "meaningful": True,
            }
        else:
            patient = group_privacy(eps, self.delta, images_per_case)
        return {
            "unit": self.unit,
            "epsilon": round(eps, 4),
            "delta": self.delta,
            "patient_level": patient,
            "steps": steps,
            "planned_steps": self.planned_steps,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": round(self.noise_multiplier, 6),
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": round(self.sample_rate, 6),
            "accountant": self.accountant,
        }


def case_index(case_ids: np.ndarray) -> np.ndarray:
    """Each image's case as 0..K-1, numbered in order of first appearance (so that with one
    image per case, case k is image k and case-level sampling draws what image-level does)."""
    _, first, inverse = np.unique(case_ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def dp_units(cfg: Config, case_ids: np.ndarray) -> int:
    """A site's training units under ``privacy.dp.unit``: its images, or its cases."""
    if cfg.privacy.dp.unit == "case":
        return len(np.unique(case_ids))
    return len(case_ids)


def largest_case(case_ids: np.ndarray) -> int:
    """The most images one case (patient or video) holds: the k of :func:`group_privacy`."""
    if len(case_ids) == 0:
        return 1
    return int(np.unique(case_ids, return_counts=True)[1].max())


def group_privacy(epsilon: float, delta: float, k: int) -> dict[str, Any]:
    """What (epsilon, delta)-DP per image guarantees a case (patient) with up to ``k`` images:
    (k epsilon, k e^((k-1) epsilon) delta)-DP, the basic group-privacy bound (Dwork and Roth
    2014, section 2.3, extended to delta > 0). With delta_k >= 1 it guarantees nothing,
    and ``meaningful`` says so. DP-SGD here samples images, not patients: this is the honest
    patient-level reading of a per-image budget, not a patient-level mechanism."""
    if k < 1:
        raise ValueError(f"group_privacy: k must be >= 1, got {k}")
    eps_k = k * epsilon
    log_delta_k = math.log(k) + (k - 1) * epsilon + math.log(delta) if delta > 0 else -math.inf
    # In logs only to decide; computed directly where it is below 1 (no overflow there).
    delta_k = k * math.exp((k - 1) * epsilon) * delta if log_delta_k < 0.0 else 1.0
    return {
        "max_images_per_case": k,
        "epsilon": round(eps_k, 4),
        "delta": delta_k,
        "meaningful": bool(log_delta_k < 0.0),
    }


def planned_epochs(cfg: Config, has_finetune: bool, passes_per_round: int) -> int:
    """Epochs of training a site takes in a run (every round counted, as if always sampled)."""
    finetune = cfg.finetune.epochs if has_finetune else 0
    return cfg.federation.rounds * passes_per_round + finetune


def _accountant(name: str) -> Any:
    from opacus.accountants import create_accountant

    return create_accountant(name)


def epsilon_spent(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps (sampling rate ``q``, noise
    multiplier ``sigma``) at ``delta``, by Opacus's ``accountant`` ("prv" or "rdp")."""
    if steps <= 0:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(delta))


def plan_site(cfg: Config, name: str, n: int, epochs: int) -> SiteDP:
    """The DP-SGD parameters of site ``name`` with ``n`` training units (images, or cases
    under ``privacy.dp.unit=case``) and ``epochs`` planned epochs; a :class:`ConfigError`
    naming the key when no accountant can use them."""
    dp = cfg.privacy.dp
    b = cfg.train.batch_size
    if b >= n:
        what = "training images" if dp.unit == "image" else "training cases (patients or videos)"
        hint = "" if dp.unit == "image" else "; under privacy.dp.unit=case it counts cases"
        raise ConfigError(
            f"privacy.dp: site '{name}' has {n} {what}; Poisson sampling needs "
            f"train.batch_size={b} below that (sampling rate B/n < 1){hint}"
        )
    q = b / n
    steps_per_epoch = max(1, round(n / b))
    planned = epochs * steps_per_epoch
    delta = dp.delta if dp.delta is not None else 1.0 / (10 * n)
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        assert dp.epsilon is not None  # config validation: exactly one of the two
        from opacus.accountants.utils import get_noise_multiplier

        try:
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=dp.epsilon,
                    target_delta=delta,
                    sample_rate=q,
                    steps=planned,
                    accountant=dp.accountant,
                    epsilon_tolerance=0.01,
                )
            )
        except (ValueError, RuntimeError, OverflowError) as err:
            raise ConfigError(
                f"privacy.dp.epsilon={dp.epsilon:g}: the {dp.accountant} accountant finds no "
                f"noise multiplier for site '{name}' ({planned} steps at sampling rate "
                f"{q:.4g}, delta {delta:.3g}): {err}"
            ) from None
    return SiteDP(
        sigma,
        dp.max_grad_norm,
        q,
        steps_per_epoch,
        b,
        delta,
        dp.accountant,
        planned,
        dp.epsilon,
        dp.unit,
    )


# ------------------------------------------------------------------------ client-level DP


def client_delta(cfg: Config) -> float:
    d = cfg.privacy.client_dp.delta
    return d if d is not None else 1.0 / (10 * len(cfg.data.clients))


def client_epsilon(cfg: Config, rounds: int) -> float:
    """Epsilon of DP-FedAvg after ``rounds`` rounds (every site in every round: rate 1)."""
    c = cfg.privacy.client_dp
    return epsilon_spent("rdp", c.noise_multiplier, 1.0, rounds, client_delta(cfg))


def privacy_summary(
    cfg: Config, clients: dict[str, Any], server: StateDict
) -> dict[str, Any] | None:
    """``summary.json``'s ``privacy`` section (None without DP): each site's spent (epsilon,
    delta) under sample-level DP, and client-level DP's."""
    p = cfg.privacy
    if not (p.dp.enabled or p.client_dp.enabled):
        return None
    out: dict[str, Any] = {}
    if p.dp.enabled:
        unit = "sample-level" if p.dp.unit == "image" else "case-level (patient or video)"
        out["dp"] = f"{unit} DP-SGD at each site (Opacus; Poisson sampling)"
        out["delta"] = p.dp.delta if p.dp.delta is not None else "1/(10 n) per site"
        out["clients"] = {n: c["privacy"] for n, c in clients.items() if "privacy" in c}
    if p.client_dp.enabled:
        rounds = int(server[CLIENT_DP_ROUNDS]) if CLIENT_DP_ROUNDS in server else 0
        c = p.client_dp
        out["client_level"] = {
            "mechanism": "DP-FedAvg (server-side clipping, Gaussian noise on the mean)",
            "epsilon": round(client_epsilon(cfg, rounds), 4),
            "delta": client_delta(cfg),
            "rounds": rounds,
            "noise_multiplier": c.noise_multiplier,
            "clip_norm": c.clip_norm,
            "accountant": "rdp",
        }
    return out
