"""``centralized``'s own path through the protocol: one trainer on the pooled training sets.

The pooled trainer is a site like the others, named :data:`POOLED`, whose training split is the
union of every client's (:func:`fedoap.data.dataset.pool_training_sets`). It trains every round;
the clients only validate (each still selects its model on its own validation split) and test.
Pooling moves raw data, not model messages, so nothing is counted as sent, and the pooled
trainer cannot be excluded: without it nothing trains. Only the in-process runtime can run it.
"""

from __future__ import annotations

from fedoap.federation.server import Server
from fedoap.federation.site import Step

POOLED = "__pooled__"  # not a client name: it has two underscores in a row


class PooledServer(Server):
    """The server of a method that declares ``pooled`` (``centralized``)."""

    def _trainers(self, sampled: list[str]) -> list[str]:
        return [POOLED]

    def _extra_steps(self, rnd: int) -> dict[str, Step]:
        return {POOLED: Step(rnd, "federated", fit=True)}

    def _sends_models(self, trainer: str) -> bool:
        return False

    def _was_sampled(self, site: str, sampled: list[str]) -> bool:
        return True  # every client's model is the pooled one, trained every round

    def _train_loss(self, site: str) -> float | None:
        return self.losses.get(POOLED)

    def _can_exclude(self, trainer: str) -> bool:
        return trainer != POOLED
