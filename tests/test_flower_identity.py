"""Which node holds which site on Flower: a site is pinned to its node, its sizes to
its first join, and every refused claim is recorded.

Unit tests of :class:`~fedoap.federation.flower_transport.FlowerTransport` over a fake ``Grid`` that
answers at once, the way the SuperLink and the real ClientApp would (same record names, an
error reply for an unavailable node). No Flower process is started.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import pytest

pytest.importorskip("flwr", reason="Flower tests need pip install -e '.[flower]'")

from flwr.app import Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.proto.node_pb2 import NodeInfo  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedoap.federation.flower_records import METRICS, step_records  # noqa: E402
from fedoap.federation.flower_transport import NODE_UNAVAILABLE, FlowerTransport  # noqa: E402
from fedoap.federation.site import Step  # noqa: E402

NAMES = ["mri", "us", "ct"]
SIZES = {"mri": (36, 4, 4), "us": (30, 3, 3), "ct": (30, 3, 3)}

Answer = Callable[[Message], Message | None]  # None: the node never replies


def site(index: Any, sizes: tuple[int, int, int] | None = None) -> Answer:
    """A node running the real protocol for site ``index`` (it may claim anything)."""
    train, val, test = sizes or SIZES[NAMES[index]]

    def answer(msg: Message) -> Message:
        if msg.metadata.message_type == "query":  # flower_site.identify()'s reply
            claim = {"client-index": index, "num-train": train, "num-val": val, "num-test": test}
            return Message(content=RecordDict({METRICS: MetricRecord(claim)}), reply_to=msg)
        result = json.dumps({"rows": [], "test": None, "seconds": {"train": 0.1}})
        return Message(content=RecordDict(step_records(result, None, 0, 0.0)), reply_to=msg)

    return answer


def unavailable(msg: Message) -> Message:
    """What the SuperLink answers for a node whose heartbeats stopped."""
    return Message(Error(code=NODE_UNAVAILABLE, reason="node unavailable"), reply_to=msg)


def silent(msg: Message) -> None:
    return None


class FakeGrid(Grid):
    """The SuperLink as a ServerApp sees it: the online nodes (with their public keys), and a
    reply per message from the node's ``Answer``."""

    def __init__(self) -> None:
        self.online: dict[int, Answer] = {}
        self.keys: dict[int, bytes] = {}
        self.sent: list[tuple[int, str]] = []  # (node, message type), in order
        self._replies: dict[str, Message] = {}

    def connect(self, node: int, answer: Answer, key: bytes | None = None) -> None:
        self.online[node] = answer
        self.keys[node] = key if key is not None else f"key-{node}".encode()

    def get_node_ids(self) -> Iterable[int]:
        return list(self.online)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=self.keys[n]) for n in self.online]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"msg-{len(self.sent)}"
            msg.metadata.__dict__["_message_id"] = mid  # as the SuperLink sets it
            node = msg.metadata.dst_node_id
            self.sent.append((node, msg.metadata.message_type))
            reply = self.online.get(node, unavailable)(msg)
            if reply is not None:
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def queried(self, node: int) -> int:
        return self.sent.count((node, "query"))

    def trained(self, node: int) -> int:
        return self.sent.count((node, "train"))

    # Not used by FlowerTransport.
    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def send_and_receive(self, *args: Any, **kwargs: Any) -> Iterable[Message]:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def set_run(self, run: Any) -> None:
        raise NotImplementedError


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp process before it builds messages."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def joined(grid: FakeGrid, **kwargs: Any) -> FlowerTransport:
    """Nodes 1, 2, 3 hold mri, us, ct."""
    for i in range(len(NAMES)):
        grid.connect(i + 1, site(i))
    transport = FlowerTransport(grid, {}, NAMES, timeout=0.3, **kwargs)
    transport.wait_for_all(deadline_s=5)
    assert transport.nodes == {1: "mri", 2: "us", 3: "ct"}
    return transport


def step(transport: FlowerTransport, rnd: int) -> tuple[set[str], dict[str, str]]:
    """One validation-free step at every site: who replied, and who was lost (why)."""
    steps = {n: Step(round=rnd, stage="federated") for n in NAMES}
    replies, lost = transport.exchange(steps, {}, {})
    return set(replies), lost


def refusals(transport: FlowerTransport) -> list[dict[str, Any]]:
    return list(transport.describe()["transport"]["refused_nodes"])


def test_an_impostor_claiming_a_connected_site_is_refused_and_the_site_keeps_its_node():
    # Prepare: three sites joined; node 66 claims to be mri, with mri's very sizes.
    grid = FakeGrid()
    transport = joined(grid)
    grid.connect(66, site(0))
    # Execute
    replied, lost = step(transport, 1)
    replied2, _ = step(transport, 2)
    # Assert: mri is still node 1, which got both steps; the impostor got none, and was
    # asked once.
    assert transport.nodes == {1: "mri", 2: "us", 3: "ct"}
    assert replied == replied2 == set(NAMES) and not lost
    assert (grid.trained(1), grid.trained(66)) == (2, 0)
    assert grid.queried(66) == 1
    [refused] = refusals(transport)
    assert (refused["step"], refused["node"], refused["claimed"]) == (1, 66, "mri")
    assert "held by node 1" in refused["reason"]
    assert transport.describe()["transport"]["rejoined"] == []


def test_a_site_whose_node_flower_reports_unavailable_is_taken_over_by_its_new_node():
    # Prepare: us's SuperNode dies in step 1; its supervisor starts a new one (node 20).
    grid = FakeGrid()
    transport = joined(grid)
    grid.connect(2, unavailable)
    # Execute
    replied, lost = step(transport, 1)
    del grid.online[2]  # the SuperLink marked it offline
    grid.connect(20, site(1))
    replied2, lost2 = step(transport, 2)
    # Assert
    assert replied == {"mri", "ct"} and "unavailable" in lost["us"]
    assert replied2 == set(NAMES) and not lost2
    assert transport.nodes == {1: "mri", 3: "ct", 20: "us"}
    assert transport.rejoined == [{"round": 2, "client": "us", "node": 20}]
    assert refusals(transport) == []


def test_with_node_auth_a_restarted_supernode_rejoins_under_its_old_node_id():
    # With --enable-supernode-auth a restarted SuperNode activates its registered key's node
    # id again (Flower 1.42, LinkState.activate_node): the id Flower reported unavailable.
    grid = FakeGrid()
    transport = joined(grid)
    grid.connect(2, unavailable)
    _, lost = step(transport, 1)
    del grid.online[2]
    _, lost2 = step(transport, 2)  # still down: the site waits
    grid.connect(2, site(1))
    replied3, lost3 = step(transport, 3)
    assert "unavailable" in lost["us"] and lost2 == {"us": "not connected"}
    assert replied3 == set(NAMES) and not lost3
    assert transport.rejoined == [{"round": 3, "client": "us", "node": 2}]


def test_a_site_restarted_while_its_old_node_is_still_online_takes_over_once_it_is_gone():
    # Prepare: us's old node 2 stopped answering but is still within Flower's heartbeat
    # patience; its restarted SuperNode (node 20) is already up.
    grid = FakeGrid()
    transport = joined(grid)
    grid.connect(2, silent)
    grid.connect(20, site(1))
    # Execute
    _, lost = step(transport, 1)
    del grid.online[2]  # the SuperLink stops listing it
    replied2, lost2 = step(transport, 2)
    # Assert: refused (not evicting a node that may be alive), then asked again and let in.
    assert "no reply" in lost["us"] and grid.trained(20) == 1 and not lost2
    assert replied2 == set(NAMES)
    assert [(r["step"], r["node"], r["claimed"]) for r in refusals(transport)] == [(1, 20, "us")]
    assert transport.rejoined == [{"round": 2, "client": "us", "node": 20}]
    assert transport.nodes[20] == "us" and 2 not in transport.nodes


def test_a_rejoining_node_declaring_other_sizes_is_refused_with_both_values():
    # Prepare: us (30 training cases at its first join) is lost; a node comes back as us with
    # 99, i.e. three times the aggregation weight.
    grid = FakeGrid()
    transport = joined(grid)
    grid.connect(2, unavailable)
    step(transport, 1)
    del grid.online[2]
    grid.connect(20, site(1, sizes=(99, 3, 3)))
    # Execute
    replied, lost = step(transport, 2)
    step(transport, 3)
    # Assert: refused for good (asked once), the pinned sizes unchanged, us lost.
    assert replied == {"mri", "ct"} and lost == {"us": "not connected"}
    assert transport.sizes["us"] == {"train": 30, "val": 3, "test": 3}
    assert grid.queried(20) == 1 and 20 in transport.dead
    [refused] = refusals(transport)
    assert (refused["step"], refused["node"], refused["claimed"]) == (2, 20, "us")
    assert "'train': 99" in refused["reason"] and "'train': 30" in refused["reason"]
    assert transport.rejoined == []


@pytest.mark.parametrize("index", [7, -1, 1.0])
def test_a_bad_client_index_is_refused_and_recorded(index):
    grid = FakeGrid()
    transport = joined(grid)
    grid.connect(9, site(index, sizes=(30, 3, 3)))
    step(transport, 1)
    step(transport, 2)
    assert 9 not in transport.nodes and 9 in transport.dead and grid.queried(9) == 1
    assert grid.trained(9) == 0
    [refused] = refusals(transport)
    assert (refused["step"], refused["node"], refused["claimed"]) == (1, 9, None)
    assert f"client-index {index!r}" in refused["reason"]


def test_the_pinned_sizes_and_refusals_survive_a_server_restart():
    # Prepare: a run that refused an impostor, checkpointed (as JSON, like the checkpoint).
    grid = FakeGrid()
    first = joined(grid)
    grid.connect(66, site(2))
    step(first, 1)
    history = json.loads(json.dumps(first.history()))
    # Execute: the server restarts; its history is restored before the nodes are asked again
    # (server_main), and ct's node now declares 31 training cases.
    grid2 = FakeGrid()
    grid2.connect(1, site(0))
    grid2.connect(2, site(1))
    grid2.connect(3, site(2, sizes=(31, 3, 3)))
    again = FlowerTransport(grid2, {}, NAMES, timeout=0.3)
    again.restore_history(history)
    again.identify()
    again.restore_history(history)  # Server.restore restores it again: nothing is lost
    # Assert
    assert again.nodes == {1: "mri", 2: "us"}
    assert again.sizes["ct"] == {"train": 30, "val": 3, "test": 3}
    assert [(r["node"], r["claimed"]) for r in refusals(again)] == [(66, "ct"), (3, "ct")]
    assert "'train': 31" in refusals(again)[1]["reason"]


def test_with_pinned_keys_a_lost_site_is_taken_over_only_by_its_own_key():
    # Prepare: node auth on and pin_keys; us is lost, and a node with another registered key
    # claims it.
    grid = FakeGrid()
    transport = joined(grid, pin_keys=True)
    grid.connect(2, unavailable)
    step(transport, 1)
    del grid.online[2]
    grid.connect(20, site(1), key=b"another site's key")
    # Execute
    _, lost = step(transport, 2)
    # Assert
    assert lost == {"us": "not connected"} and 20 in transport.dead
    [refused] = refusals(transport)
    assert refused["claimed"] == "us" and "public key" in refused["reason"]
    assert transport.describe()["transport"]["site_keys"].keys() == set(NAMES)


def test_a_site_declaring_more_images_than_the_bound_is_refused_at_join():
    # Prepare: us declares 10^9 training images, which would carry the weighted mean.
    grid = FakeGrid()
    for i, name in enumerate(NAMES):
        grid.connect(i + 1, site(i, (10**9, 3, 3) if name == "us" else None))
    transport = FlowerTransport(grid, {}, NAMES, timeout=0.3, max_train=1000)
    # Execute
    transport.identify()
    replied, lost = step(transport, 1)
    # Assert: us never trains; the others do, with their own sizes.
    assert transport.nodes == {1: "mri", 3: "ct"}
    assert replied == {"mri", "ct"} and "us" in lost
    assert grid.trained(2) == 0
    [refused] = refusals(transport)
    assert refused["claimed"] == "us"
    assert refused["reason"].endswith(
        "it declares 1000000000 training images, more than federation.max_train_examples=1000"
    )
