"""The Flower adapter: a ``ServerApp`` and a ``ClientApp`` over the one protocol of
:mod:`fedoap.federation.server` and :mod:`fedoap.federation.site` (Flower 1.42 Message API,
public API only).

Messages:

* **query** (when a node first appears): the node says which configured site it is and its
  split sizes. A site that restarts comes back as a new node (with node auth, under its old
  node id) and is identified again.
* **train** (one per site per step, see :mod:`fedoap.federation.site`): the
  :class:`~fedoap.federation.site.Step` as JSON in the ConfigRecord, the global arrays in one
  ArrayRecord when the step validates or trains. The node loads its own state from its site
  folder (:func:`~fedoap.federation.state.load_site_state`), runs the step, saves its state
  after it, and replies with a ConfigRecord ``result`` (validation rows, its test entry, seconds
  per phase) and, when it trained, one ArrayRecord (namespaced ``shared.*`` / ``kv.*`` keys) and
  a MetricRecord (``num-examples``, ``train-loss``, byte counts).

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

Personal parameters, optimiser state and the selected model stay in the site's folder
(``<output-dir>/checkpoints/site/<name>/``, ``checkpoints/best/<name>.safetensors``) and never
enter a message. The resolved fedoap config travels from the server in every ConfigRecord, so a
site needs only its own data path (``--node-config "client-name=... data-path=..."``).

Not supported here, by design: ``centralized`` (pools raw data) and ``feddp`` (its fine-tuning
needs every site's personal query projection, i.e. each client's individual model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from fedoap.algorithms import Algorithm, Update, build_algorithm
from fedoap.config import (
    VOLUME_SOURCES,
    ClientSpec,
    Config,
    ConfigError,
    from_dict,
    load_yaml,
    validate,
)
from fedoap.data.dataset import make_client
from fedoap.errors import CheckpointError, FederationError
from fedoap.federation.flower_client import (
    ARRAYS,
    CONFIG,
    METRICS,
    RESULT,
    client_app,
    process_age,
    step_records,
)
from fedoap.federation.server import Server
from fedoap.federation.site import Reply, Site, Step
from fedoap.federation.state import (
    RunState,
    SiteState,
    load_run_state,
    load_site_state,
    save_selected,
    save_site_state,
)
from fedoap.models import FedOAPNet, StateDict
from fedoap.runs import RunDir
from fedoap.training.device import Timer, place, resolve_precision, session, setup

#: Flower error codes (flwr.common.constant.ErrorCode, 1.42) that mean the site went away, not
#: that its code failed: the site is lost for the step, and the run goes on.
NODE_UNAVAILABLE = 5
SITE_GONE = {
    3: "Flower: the message to the site became unavailable",
    4: "Flower: the site's reply became unavailable",
    NODE_UNAVAILABLE: "Flower: the site's node is unavailable (no heartbeat)",
    8: "Flower: the site's ClientApp process crashed",
}


def unsupported_reason(alg: Algorithm) -> str | None:
    """Why a method cannot run on Flower, or None."""
    if alg.pooled:
        return f"{alg.name} pools the clients' raw training data; it has no federated form"
    if type(alg).finetune_payload is not Algorithm.finetune_payload:
        return (
            f"{alg.name}'s fine-tuning needs every client's personal parameters at the server "
            "(each client's individual model); the Flower runtime never sends personal keys"
        )
    return None


def _i(record: Any, key: str) -> int:
    """An int from a Flower record (their values are typed as a wide union)."""
    return int(cast(Any, record[key]))


def _s(record: Any, key: str) -> str:
    return str(cast(Any, record[key]))


def config_from_yaml(text: str) -> Config:
    cfg = from_dict(Config, load_yaml(text, "fedoap-config"))
    validate(cfg)
    return cfg


# ============================================================================ client side


@dataclass
class _Built:
    """What a node builds once per process and reuses across messages (Flower's simulation
    keeps its workers; a deployment starts a process per message)."""

    site: Site
    out: RunDir  # the site's folder
    index: int


_SITES: dict[tuple[str, str, str, str, str], _Built] = {}
_HANDLED = 0  # messages this process has handled (the first pays the process start)


def _build(nc: Mapping[str, Any], cfg_yaml: str, run_dir: str) -> tuple[_Built, float]:
    """Resolve which site this node is (``nc``: its node config) and load its data (cached per
    process); returns it and the seconds spent building it now."""
    t0 = time.perf_counter()
    cfg = config_from_yaml(cfg_yaml)
    names = [c.name for c in cfg.data.clients]
    if "client-name" in nc:
        name = _s(nc, "client-name")
        if name not in names:
            raise ConfigError(f"node-config client-name={name!r} is not one of {names}")
    elif "partition-id" in nc:  # simulation: virtual node i is client i
        name = names[_i(nc, "partition-id")]
    else:
        raise ConfigError("node-config needs client-name (deployment) or partition-id (simulation)")
    if "device" in nc:  # the site's own choice; otherwise train.device ("auto": CUDA if present)
        device_spec = _s(nc, "device")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device_spec))
    out = str(nc.get("output-dir", run_dir))
    key = (cfg.digest(), name, str(nc.get("data-path", "")), str(cfg.train.device), out)
    if key in _SITES:
        return _SITES[key], 0.0
    spec = next(c for c in cfg.data.clients if c.name == name)
    if "data-path" in nc:  # the site's own copy of its data
        path = _s(nc, "data-path")
        # A volume dataset stays one (with its channel, labels and slicing); otherwise a folder
        # holds image/mask pairs and a file is an npz.
        source = spec.source
        if source not in VOLUME_SOURCES:
            source = "folder" if Path(path).is_dir() else "npz"
        spec = ClientSpec(**{**spec.__dict__, "path": path, "source": source})
    device = setup(cfg.train)
    if cfg.train.compile:
        # Flower 1.42 starts a ClientApp process per message, and compiling is per process.
        warnings.warn(
            "train.compile on Flower: each ClientApp process compiles its model, and Flower "
            "starts one per message (the inductor cache on disk shortens all but the first)",
            stacklevel=2,
        )
    alg = build_algorithm(cfg)
    model = cast(
        FedOAPNet,
        place(alg.build_model(), cfg.train, device, per_example_grads=cfg.privacy.dp.enabled),
    )
    data = make_client(spec, cfg.data).to(device)  # from the preprocessed cache
    rd = RunDir(Path(out))
    record = SiteState(alg.init_client(model))

    def selected(site: Site) -> None:
        assert site.final is not None
        weights, kv = site.final
        save_selected(rd, site.name, weights, kv, site.record.best_round, alg.name, cfg.digest())

    site = Site(cfg, alg, model, data, record, Timer(device), on_selected=selected)
    _SITES[key] = _Built(site, rd, names.index(name))
    return _SITES[key], time.perf_counter() - t0


#: The last line of a traceback that raised one of fedoap's errors: "fedoap.x.YError: message".
_FEDOAP_ERROR = re.compile(r"^\s*fedoap(?:\.\w+)+Error: (.+)$", re.MULTILINE)


def client_error(reason: str) -> str:
    """A failed ClientApp's message without the Ray and Flower tracebacks around it (a site's
    DivergedError or DataError reads as it does in-process)."""
    found = _FEDOAP_ERROR.findall(reason)
    if found:
        return str(found[-1]).strip()
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    return lines[-1] if lines else reason


def _reply(msg: Message, records: dict[str, Any]) -> Message:
    return Message(content=RecordDict(records), reply_to=msg)


def identify(nc: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, int]:
    """Which configured site this node is, and its split sizes (the query message)."""
    built, _ = _build(nc, str(config["fedoap-config"]), str(config["run-dir"]))
    sizes = built.site.data.sizes()
    return {
        "client-index": built.index,
        "num-train": sizes["train"],
        "num-val": sizes["val"],
        "num-test": sizes["test"],
    }


def run_step(
    nc: Mapping[str, Any], config: Mapping[str, Any], global_arrays: StateDict, startup: float
) -> tuple[dict[str, Any], Update | None]:
    """One step at this site: its state from its folder, the step, its state back to its folder.
    Returns the reply's result (validation rows, test entry, seconds per phase, the step its
    state came from) and its upload, if it trained."""
    built, build_s = _build(nc, str(config["fedoap-config"]), str(config["run-dir"]))
    site, rd = built.site, built.out
    step = Step(**json.loads(str(config["step"])))
    t0 = time.perf_counter()
    found = load_site_state(rd, site.name, before=step.round)
    rows: list[dict[str, Any]] = []
    resumed_from = 0
    if found is None:
        site.record = SiteState(site.alg.init_client(site.model))
    else:
        resumed_from, site.record, meta = found
        rows = list(meta.get("rows", []))
    note = None
    if step.round > 1 and resumed_from < step.round - 1:
        note = (
            f"site '{site.name}' rejoins at step {step.round} from its state after step "
            f"{resumed_from}"
        )
    load_s = time.perf_counter() - t0
    with session(site.cfg.train, next(site.model.parameters()).device):
        reply = site.handle(step, global_arrays, {})
    if reply.diverged is not None:
        raise reply.diverged
    t0 = time.perf_counter()
    rows += reply.rows
    save_site_state(rd, site.name, step.round, site.record, {"rows": rows})
    if reply.test is not None:  # the site's own record of its run
        own = RunDir(rd.root / "sites" / site.name)
        own.root.mkdir(parents=True, exist_ok=True)
        own.write_metrics(rows)
        own.write_json(own.root / "test.json", reply.test)
    seconds = {
        "startup": startup,
        "data": build_s,
        "state": load_s + time.perf_counter() - t0,
        **reply.seconds,
    }
    result = {
        "rows": reply.rows,
        "test": reply.test,
        "seconds": seconds,
        "resumed_from": resumed_from,
        "note": note,
    }
    return result, reply.update


def _config(msg: Message) -> dict[str, Any]:
    return {str(k): v for k, v in msg.content[CONFIG].items()}


def query_handler(msg: Message, context: Context) -> Message:
    """The query message, in this process."""
    metrics = MetricRecord(cast(Any, identify(context.node_config, _config(msg))))
    return _reply(msg, {METRICS: metrics})


def train_handler(msg: Message, context: Context) -> Message:
    """A step message, in this process (simulation, or ``worker=false``)."""
    global _HANDLED
    age = (process_age() or 0.0) if _HANDLED == 0 else 0.0
    _HANDLED += 1
    global_arrays: StateDict = {}
    if ARRAYS in msg.content.array_records:
        global_arrays = msg.content.array_records[ARRAYS].to_torch_state_dict()
    result, update = run_step(context.node_config, _config(msg), global_arrays, age)
    if result["note"]:
        print(result["note"], flush=True)  # into the SuperNode's log
    if update is None:
        return _reply(msg, step_records(json.dumps(result), None, 0, 0.0))
    records = step_records(
        json.dumps(result),
        ArrayRecord(update.arrays),
        update.num_examples,
        float(update.metrics["train_loss"]),
    )
    return _reply(msg, records)


# ============================================================================ server side


SPLITS = ("train", "val", "test")


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


def _size(m: Message) -> int:
    """A message's payload bytes as Flower counts them."""
    return sum(r.count_bytes() for r in m.content.values())


class FlowerTransport:
    """Steps as Flower messages: one per site per step, through the public ``Grid`` API.

    Which node holds which site, and the refusals, are described in the module docstring.
    ``pin_keys``: keep each site pinned to the public key it first joined with (meaningful only
    with SuperNode authentication, where a node's key is registered and outlives its process).
    """

    runtime = "flower"
    trusted = False

    def __init__(
        self,
        grid: Grid,
        base: dict[str, str],
        names: list[str],
        timeout: float,
        log: Any = print,
        pin_keys: bool = False,
        max_train: int | None = None,
    ) -> None:
        self.grid, self.base, self.names, self.timeout, self.log = grid, base, names, timeout, log
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
        msgs = [
            Message(
                content=RecordDict({CONFIG: ConfigRecord(dict(self.base))}),
                message_type=MessageType.QUERY,
                dst_node_id=n,
            )
            for n in new
        ]
        for node, m in self._send_and_receive(msgs, min(self.timeout, 600)):
            self.parked.pop(node, None)
            if m.has_error():
                if m.error.code == NODE_UNAVAILABLE:
                    continue  # asked again if the SuperLink lists it again
                self.log(
                    f"warning: node {node} failed to identify: {client_error(str(m.error.reason))}"
                )
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
                self.log(f"site '{name}': its node {holder} is no longer connected")
            if step and name in self.sizes:
                self.rejoined.append({"round": step, "client": name, "node": node})
                self.log(f"site '{name}' rejoined as node {node} at step {step}")
            self.nodes[node] = name
            self.sizes.setdefault(name, sizes)
            if key:
                self.keys.setdefault(name, key)

    def _claim(self, m: Message, key: str) -> tuple[str, dict[str, int]]:
        """A query reply's claim, (site, its sizes), checked against what the site joined with
        (its sizes, and with ``pin_keys`` its node's key); raises :class:`_Refused`."""
        try:
            r = m.content.metric_records[METRICS]
            idx, sizes = r.get("client-index"), {s: r.get(f"num-{s}") for s in SPLITS}
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
        self.log(f"warning: node {node} refused: {reason}")

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
            content: dict[str, Any] = {
                CONFIG: ConfigRecord({**self.base, "step": json.dumps(dataclasses.asdict(step))})
            }
            if step.needs_global() and arrays is not None:
                content[ARRAYS] = arrays
            msgs.append(
                Message(
                    content=RecordDict(content),
                    message_type=MessageType.TRAIN,
                    dst_node_id=node_of[name],
                )
            )
        t0 = time.perf_counter()
        routed = self._send_and_receive(msgs, self.timeout)
        answers = [m for _, m in routed]
        record: dict[str, Any] = {
            "round": first.round,
            "stage": first.stage,
            "wall_s": time.perf_counter() - t0,
            "bytes_down": sum(_size(m) for m in msgs),
            "bytes_up": sum(_size(m) for m in answers if not m.has_error()),
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
            result = json.loads(_s(m.content.config_records[CONFIG], RESULT))
            seconds = {k: float(v) for k, v in result["seconds"].items()}
            reply = Reply(rows=list(result["rows"]), test=result["test"], seconds=seconds)
            for row in reply.rows:
                row["client"] = name  # Flower's routing says who this is
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return Reply(refused=f"the reply has no valid result record ({err!r})"), {}
        if ARRAYS in m.content.array_records:
            try:
                arrays = m.content.array_records[ARRAYS].to_torch_state_dict()
                metrics = m.content.metric_records[METRICS]
                n, loss = metrics.get("num-examples"), metrics.get("train-loss")
            except (KeyError, TypeError, ValueError) as err:
                reply.refused = f"the upload lacks its {ARRAYS} or {METRICS} record ({err!r})"
                return reply, seconds
            self.received_keys.append(sorted(arrays))
            reply.update = Update(arrays, cast(Any, n), {"train_loss": cast(Any, loss)})
        return reply, seconds

    def site_states(self) -> dict[str, SiteState]:
        return {}  # each site keeps its own

    def restore_sites(self, rs: RunState) -> None:
        pass  # each site resumes from its own folder

    def finetune_payload(self, global_arrays: StateDict, active: list[str]) -> StateDict:
        return {}  # methods that need one are refused on Flower (unsupported_reason)

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
        sites' pinned sizes and keys apply to them (:func:`server_main` does); refusals made in
        this process before it are kept after the restored ones, so it may be called twice."""
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


server_app = ServerApp()


def _flag(context: Context, key: str) -> bool:
    return str(context.run_config.get(key, "false")).lower() in ("1", "true", "yes")


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """The run in ``run-dir``, under its lock (a second run or resume of the folder is refused,
    naming the holder), unless ``lock-held``: the ``fedoap run`` that launched this simulation
    holds it for the ServerApp."""
    rd = RunDir(Path(_s(context.run_config, "run-dir")))
    if _flag(context, "lock-held"):
        _serve(grid, context, rd)
        return
    with rd.lock():
        _serve(grid, context, rd)


def _serve(grid: Grid, context: Context, rd: RunDir) -> None:
    run_dir = rd.root
    resume = _flag(context, "resume")
    # A config written by hand may leave train.precision at auto: the server decides it once,
    # on its device, and every site trains in it (the run's identity holds one precision).
    cfg_yaml = rd.config.read_text()
    cfg = resolve_precision(config_from_yaml(cfg_yaml))
    if cfg.train.precision != config_from_yaml(cfg_yaml).train.precision:
        cfg_yaml = cfg.to_yaml()
    alg = build_algorithm(cfg)
    reason = unsupported_reason(alg)
    if reason:
        raise ConfigError(f"method {cfg.method} cannot run on Flower: {reason}")
    names = [c.name for c in cfg.data.clients]
    base = {"fedoap-config": cfg_yaml, "run-dir": str(run_dir.resolve())}
    pin_keys = _flag(context, "pin-node-keys")
    transport = FlowerTransport(
        grid,
        base,
        names,
        cfg.federation.round_timeout_s,
        pin_keys=pin_keys,
        max_train=cfg.federation.max_train_examples,
    )
    rs = None
    if resume and rd.last.is_file():
        rs = load_run_state(rd, cfg.digest())
        if rs.runtime != "flower":
            raise CheckpointError(f"{rd.last} is not a Flower server's checkpoint")
        # Before the nodes are asked again: the sizes (and keys) the sites joined with hold.
        transport.restore_history(rs.history.get("transport", {}))
    transport.wait_for_all()
    model = alg.build_model()
    server = Server(
        cfg,
        alg,
        transport,
        rd,
        names,
        {n: s["train"] for n, s in transport.sizes.items()},
        model,
        Timer(torch.device("cpu")),
    )
    if rs is not None:
        server.restore(rs)
        print(f"resuming after {rs.stage} step {rs.done}", flush=True)
    server.run()
    rd.write_json(rd.root / "flower_received_keys.json", transport.received_keys)


__all__ = ["client_app", "server_app", "unsupported_reason"]
