"""The Flower transport the protocol's :class:`~fedoap.federation.server.Server` talks to: each
step as one Flower message per site, through the public ``Grid`` API (Flower 1.42), in the
records of :mod:`fedoap.federation.flower_records`.

Which site a reply comes from is Flower's routing (the node that sent it), never what the reply
says. A node's claim to a site (its query reply) is checked before any step goes to it
(:meth:`FlowerTransport.identify`):

* **One node per site.** A site is held by the first node that claims it. A node that claims a
  site whose node is still connected (in the SuperLink's list of online nodes) is refused and
  not asked again while that node holds the site; it is asked again once the holder is lost,
  i.e. when Flower answers a step with NODE_UNAVAILABLE or the holder drops off the SuperLink's
  list. So a SuperNode cannot evict another site by posing as it, and a site restarted while its
  old node is still counted online (within Flower's heartbeat patience, 2 x 30 s) takes over one
  identify later, when the old node is gone. A node that misses a reply, or whose ClientApp
  crashed, keeps its site.
* **Sizes are pinned at the first join.** The split sizes a site declares when it first joins
  are its aggregation weight (the server checks each upload's ``num-examples`` against them);
  a later node for that site declaring other sizes is refused for good, as is a reply with no
  valid ``client-index`` (an integer in ``0..K-1``) or sizes. The pins, and every refusal,
  survive a server restart (the checkpoint's history) and land in ``summary.json``
  (``transport.refused_nodes``).
* **What authenticates a node.** Node ids are assigned by the SuperLink, one per registered
  public key, so routing by node id is authenticated routing when the SuperLink runs with
  ``--enable-supernode-auth``: only nodes whose keys were registered can connect, and a
  restarted SuperNode comes back under its key's node id (Flower 1.42 ``activate_node`` by
  public key), which is why a lost node is asked again when it reappears. The ServerApp sees each
  node's key (``Grid.get_nodes()`` -> ``NodeInfo.public_key``); its SHA-256 fingerprint is kept
  per site (``transport.site_keys``). Without node auth every SuperNode start makes a new key
  pair, so the key adds nothing and is not enforced by default. With node auth on, turn on
  ``pin_keys`` (run config ``pin-node-keys = "true"``, once the app's ``pyproject.toml``
  declares the key): a site then stays pinned to the key it first joined with, and a node with
  another key is refused. What stays open: any admitted node may claim a site that is free,
  i.e. has never joined, or (without ``pin_keys``) whose node was lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from typing import Any, cast

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedoap.basetypes import Update
from fedoap.errors import FederationError
from fedoap.federation.flower_records import (
    ARRAYS,
    METRICS,
    message_bytes,
    query_message,
    read_claim,
    read_result,
    read_upload,
    step_message,
)
from fedoap.federation.site import Reply, Step
from fedoap.federation.state import RunState, SiteState
from fedoap.models import StateDict

#: Flower error codes (flwr.common.constant.ErrorCode, 1.42) that mean the site went away, not
#: that its code failed: the site is lost for the step, and the run goes on.
NODE_UNAVAILABLE = 5
SITE_GONE = {
    3: "Flower: the message to the site became unavailable",
    4: "Flower: the site's reply became unavailable",
    NODE_UNAVAILABLE: "Flower: the site's node is unavailable (no heartbeat)",
    8: "Flower: the site's ClientApp process crashed",
}


#: The last line of a traceback that raised one of fedoap's errors: "fedoap.x.YError: message".
_FEDOAP_ERROR = re.compile(r"^\s*fedoap(?:\.\w+)+Error: (.+)$", re.MULTILINE)

logger = logging.getLogger(__name__)


def client_error(reason: str) -> str:
    """A failed ClientApp's message without the Ray and Flower tracebacks around it (a site's
    DivergedError or DataError reads as it does in-process)."""
    found = _FEDOAP_ERROR.findall(reason)
    if found:
        return str(found[-1]).strip()
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    return lines[-1] if lines else reason


class _Refused(Exception):
    """A node's claim to a site that does not hold (``claimed``: the site it named, if any)."""

    def __init__(self, claimed: str | None, reason: str) -> None:
        super().__init__(reason)
        self.claimed = claimed


def _is_count(v: Any) -> bool:
    """A whole number >= 0 as a record carries it (an int; not a float, not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _fingerprint(public_key: bytes) -> str:
    """A node's public key as a short SHA-256 hex digest ('' when the Grid gives none)."""
    return hashlib.sha256(public_key).hexdigest()[:16] if public_key else ""


class FlowerTransport:
    """Steps as Flower messages: one per site per step, through the public ``Grid`` API.

    Which node holds which site, and the refusals, are described in the module docstring.
    ``pin_keys``: keep each site pinned to the public key it first joined with (meaningful only
    with SuperNode authentication, where a node's key is registered and outlives its process).
    """

    runtime = "flower"
    label = " on Flower"
    trusted = False
    holds_site_states = False  # each site keeps its own state, in its folder

    def __init__(
        self,
        grid: Grid,
        base: dict[str, str],
        names: list[str],
        timeout: float,
        pin_keys: bool = False,
        max_train: int | None = None,
    ) -> None:
        self.grid, self.base, self.names, self.timeout = grid, base, names, timeout
        self.pin_keys, self.max_train = pin_keys, max_train
        self.nodes: dict[int, str] = {}  # node id -> site name (Flower's routing, not a claim)
        self.dead: set[int] = set()  # refused for good, or failed to identify: never asked again
        self.parked: dict[int, str] = {}  # node -> the site it claimed while another held it
        self.sizes: dict[str, dict[str, int]] = {}  # pinned at the site's first join
        self.keys: dict[str, str] = {}  # site -> SHA-256 of its first node's public key
        self.received_keys: list[list[str]] = []
        self.steps: list[dict[str, Any]] = []  # per step: wall seconds, bytes, sites' seconds
        self.rejoined: list[dict[str, Any]] = []
        self.refused_nodes: list[dict[str, Any]] = []

    # -------------------------------------------------------------- nodes

    def identify(self, step: int = 0) -> None:
        """Ask every node not yet known which site it is (a restarted site is a new node), and
        give it the site if its claim holds (see the module docstring)."""
        # Only nodes the SuperLink counts online (heartbeats within its patience) are listed.
        online = {int(n.node_id): bytes(n.public_key) for n in self.grid.get_nodes()}
        held = {name for node, name in self.nodes.items() if node in online}
        new = [
            n
            for n in online
            if n not in self.nodes and n not in self.dead and self.parked.get(n) not in held
        ]
        if not new:
            return
        msgs = [query_message(self.base, n) for n in new]
        for node, m in self._send_and_receive(msgs, min(self.timeout, 600)):
            self.parked.pop(node, None)
            if m.has_error():
                if m.error.code == NODE_UNAVAILABLE:
                    continue  # asked again if the SuperLink lists it again
                why = client_error(str(m.error.reason))
                logger.warning(f"node {node} failed to identify: {why}")
                self.dead.add(node)
                continue
            key = _fingerprint(online.get(node, b""))
            try:
                name, sizes = self._claim(m, key)
            except _Refused as refused:
                self._refuse(step, node, refused.claimed, str(refused))
                self.dead.add(node)
                continue
            holder = next((k for k, v in self.nodes.items() if v == name), None)
            if holder is not None and holder in online:
                self._refuse(
                    step,
                    node,
                    name,
                    f"site '{name}' is held by node {holder}, which is still connected "
                    "(asked again once that node is lost)",
                )
                self.parked[node] = name
                continue
            if holder is not None:  # the SuperLink no longer lists it: lost
                del self.nodes[holder]
                logger.warning(f"site '{name}': its node {holder} is no longer connected")
            if step and name in self.sizes:
                self.rejoined.append({"round": step, "client": name, "node": node})
                logger.info(f"site '{name}' rejoined as node {node} at step {step}")
            self.nodes[node] = name
            self.sizes.setdefault(name, sizes)
            if key:
                self.keys.setdefault(name, key)

    def _claim(self, m: Message, key: str) -> tuple[str, dict[str, int]]:
        """A query reply's claim, (site, its sizes), checked against what the site joined with
        (its sizes, and with ``pin_keys`` its node's key); raises :class:`_Refused`."""
        try:
            idx, sizes = read_claim(m)
        except (KeyError, TypeError, AttributeError) as err:
            raise _Refused(None, f"its reply has no {METRICS} record ({err!r})") from None
        if not _is_count(idx) or cast(int, idx) >= len(self.names):
            raise _Refused(
                None, f"client-index {idx!r} is not an integer in 0..{len(self.names) - 1}"
            )
        name = self.names[cast(int, idx)]
        bad = {s: v for s, v in sizes.items() if not _is_count(v)}
        if bad:
            raise _Refused(name, f"its sizes {bad} are not counts")
        declared = {s: cast(int, v) for s, v in sizes.items()}
        if self.max_train is not None and declared["train"] > self.max_train:
            raise _Refused(
                name,
                f"it declares {declared['train']} training images, more than "
                f"federation.max_train_examples={self.max_train}",
            )
        pinned = self.sizes.get(name)
        if pinned is not None and declared != pinned:
            raise _Refused(
                name,
                f"it declares sizes {declared}, but site '{name}' joined with {pinned} "
                "(a site's aggregation weight is fixed at its first join)",
            )
        if self.pin_keys and name in self.keys and key != self.keys[name]:
            raise _Refused(
                name,
                f"its public key {key or '(none)'} is not the key site '{name}' joined with "
                f"({self.keys[name]})",
            )
        return name, declared

    def _refuse(self, step: int, node: int, claimed: str | None, reason: str) -> None:
        self.refused_nodes.append(
            {"step": step, "node": node, "claimed": claimed, "reason": reason}
        )
        logger.warning(f"node {node} refused: {reason}")

    def wait_for_all(self, deadline_s: float = 600) -> None:
        end = time.time() + deadline_s
        while True:
            self.identify()
            if set(self.nodes.values()) == set(self.names):
                return
            if time.time() > end:
                missing = sorted(set(self.names) - set(self.nodes.values()))
                refused = [r for r in self.refused_nodes if r["claimed"] in (None, *missing)]
                raise FederationError(
                    f"site(s) {missing} did not connect within {deadline_s} s"
                    + (f"; refused: {refused}" if refused else "")
                )
            time.sleep(0.5)

    def _send_and_receive(self, msgs: list[Message], timeout: float) -> list[tuple[int, Message]]:
        """Push the messages and pull their replies until all are in or ``timeout`` passes;
        returns (the node each went to, its reply). Like ``Grid.send_and_receive``, but it polls
        every 0.2 s instead of 3 s, and routes each reply (an error reply the SuperLink makes
        for an unavailable node included) by the message it answers."""
        ids = list(self.grid.push_messages(msgs))
        node_of = {i: m.metadata.dst_node_id for i, m in zip(ids, msgs, strict=True) if i}
        pending, out = set(node_of), []
        end = time.monotonic() + timeout
        while pending and time.monotonic() < end:
            for m in self.grid.pull_messages(list(pending)):
                answered = m.metadata.reply_to_message_id
                if answered in pending:
                    pending.discard(answered)
                    out.append((node_of[answered], m))
            if pending:
                time.sleep(0.2)
        return out

    # -------------------------------------------------------------- Transport

    def exchange(
        self, steps: dict[str, Step], global_arrays: StateDict, ft_extra: StateDict
    ) -> tuple[dict[str, Reply], dict[str, str]]:
        first = next(iter(steps.values()))
        self.identify(first.round)
        node_of = {name: node for node, name in self.nodes.items()}
        lost = {n: "not connected" for n in steps if n not in node_of}
        arrays = ArrayRecord(global_arrays) if global_arrays else None
        msgs = []
        for name, step in steps.items():
            if name not in node_of:
                continue
            sent = arrays if step.needs_global() else None
            msgs.append(step_message(self.base, dataclasses.asdict(step), sent, node_of[name]))
        t0 = time.perf_counter()
        routed = self._send_and_receive(msgs, self.timeout)
        answers = [m for _, m in routed]
        record: dict[str, Any] = {
            "round": first.round,
            "stage": first.stage,
            "wall_s": time.perf_counter() - t0,
            "bytes_down": sum(message_bytes(m) for m in msgs),
            "bytes_up": sum(message_bytes(m) for m in answers if not m.has_error()),
            "sites": {},
        }
        replies: dict[str, Reply] = {}
        gone: dict[str, str] = {}
        for node, m in routed:
            sender = self.nodes.get(node)
            if sender is None:
                continue
            name = sender
            if m.has_error() and m.error.code in SITE_GONE:
                gone[name] = SITE_GONE[m.error.code]
                continue  # lost, below
            if m.has_error():
                raise FederationError(
                    f"site '{name}' failed at step {first.round}: "
                    f"{client_error(str(m.error.reason))}"
                )
            replies[name], seconds = self._decode(m, name)
            record["sites"][name] = seconds
        for name in steps:
            if name in node_of and name not in replies:
                lost[name] = gone.get(name) or (
                    f"no reply within federation.round_timeout_s={self.timeout:g} s"
                )
                if name in gone and gone[name] == SITE_GONE[NODE_UNAVAILABLE]:
                    # Flower says the node is gone: the site is free for the node that claims
                    # it next (this one again if the SuperLink lists it again: with node auth
                    # a restarted SuperNode keeps its node id). A node that was only slow, or
                    # whose ClientApp crashed, keeps its place for the next step.
                    del self.nodes[node_of[name]]
        self.steps.append(record)
        return replies, lost

    def _decode(self, m: Message, name: str) -> tuple[Reply, dict[str, float]]:
        """A reply, checked for form only (what it uploads is the server's check)."""
        try:
            result = read_result(m)
            seconds = {k: float(v) for k, v in result["seconds"].items()}
            reply = Reply(rows=list(result["rows"]), test=result["test"], seconds=seconds)
            for row in reply.rows:
                row["client"] = name  # Flower's routing says who this is
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return Reply(refused=f"the reply has no valid result record ({err!r})"), {}
        try:
            upload = read_upload(m)
        except (KeyError, TypeError, ValueError) as err:
            reply.refused = f"the upload lacks its {ARRAYS} or {METRICS} record ({err!r})"
            return reply, seconds
        if upload is not None:
            arrays, n, loss = upload
            self.received_keys.append(sorted(arrays))
            reply.update = Update(arrays, cast(Any, n), {"train_loss": cast(Any, loss)})
        return reply, seconds

    def site_states(self) -> dict[str, SiteState]:
        return {}  # each site keeps its own

    def restore_sites(self, rs: RunState) -> None:
        pass  # each site resumes from its own folder

    def history(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "rejoined": self.rejoined,
            "received_keys": self.received_keys,
            "refused_nodes": self.refused_nodes,
            "sizes": self.sizes,
            "site_keys": self.keys,
        }

    def restore_history(self, history: dict[str, Any]) -> None:
        """The checkpoint's history. Call it before the nodes are identified again, so that the
        sites' pinned sizes and keys apply to them (the ServerApp's ``server_main`` does);
        refusals made in this process before it are kept after the restored ones, so it may be
        called twice."""
        self.steps = list(history.get("steps", []))
        self.rejoined = list(history.get("rejoined", []))
        self.received_keys = list(history.get("received_keys", []))
        restored = list(history.get("refused_nodes", []))
        self.refused_nodes = restored + [r for r in self.refused_nodes if r not in restored]
        pinned = {
            str(n): {s: int(v) for s, v in d.items()} for n, d in history.get("sizes", {}).items()
        }
        self.sizes = {**self.sizes, **pinned}  # the first join's sizes win
        self.keys = {
            **self.keys,
            **{str(n): str(k) for n, k in history.get("site_keys", {}).items()},
        }

    def describe(self) -> dict[str, Any]:
        fed = [s for s in self.steps if s["stage"] == "federated"]
        return {
            "runtime": "flower",
            "transport": {
                "rejoined": self.rejoined,
                "refused_nodes": self.refused_nodes,
                "site_keys": self.keys,
                "bytes_per_round": {
                    "up": int(sum(s["bytes_up"] for s in fed) / max(1, len(fed))),
                    "down": int(sum(s["bytes_down"] for s in fed) / max(1, len(fed))),
                },
                "steps": self.steps,
            },
        }
