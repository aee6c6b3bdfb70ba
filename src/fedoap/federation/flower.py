"""The Flower adapter: a ``ServerApp`` and a ``ClientApp`` that call the same algorithm objects as
the in-process runner (Flower 1.42 Message API).

Protocol, message by message:

* **query** (once): every node reports which configured client it is (``client-index``) and its
  split sizes. The server needs this to sample clients the way the in-process runner does.
* **train, stage=fit** (rounds 1..R, through Flower's strategy loop): the node loads its
  :class:`~fedoap.algorithms.ClientState` from ``context.state``, runs ``algorithm.fit`` on the
  global arrays it received, saves its state back to ``context.state`` and replies with **one
  ArrayRecord** (namespaced ``shared.*`` / ``kv.*`` keys, the same key set on every node) and
  **one MetricRecord** (``num-examples``, ``train-loss``, ``client-index``, byte counts). The
  strategy's ``aggregate_train`` refuses replies that fail
  :func:`~fedoap.federation.protocol.check_upload` (logged, and listed in ``summary.json`` under
  ``refused``) and calls ``algorithm.aggregate`` on the rest.
* **evaluate, stage=val** (after every round): every node personalises the new global model,
  scores its validation split and keeps its best model in ``context.state``.
* **train, stage=finetune** (epochs 1..F, methods with a fine-tuning stage): local only; the
  reply carries metrics, no arrays.
* **evaluate, stage=test** (once, at the end): each node scores its selected model on its test
  split and writes it to ``<output-dir>/checkpoints/best/<client>.safetensors``.

Personal parameters, optimiser state and the selected model live in ``context.state`` and never
enter a message. The resolved fedoap config travels from the server in every ConfigRecord, so a
site needs only its own data path (``--node-config "client-name=... data-path=..."``).

Not supported here, by design: ``centralized`` (pools raw data) and ``feddp`` (its fine-tuning
needs every site's personal query projection, i.e. each client's individual model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
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
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import message_size_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedoap.algorithms import (
    KV,
    Algorithm,
    ClientState,
    FitContext,
    Update,
    build_algorithm,
    nbytes,
)
from fedoap.algorithms.base import to_device
from fedoap.config import ClientSpec, Config, ConfigError, from_dict, load_yaml, validate
from fedoap.data.dataset import ClientData, make_client
from fedoap.errors import DivergedError
from fedoap.federation.checkpoint import flatten_optimizer, unflatten_optimizer
from fedoap.federation.protocol import Template, check_upload
from fedoap.federation.runner import sample_clients
from fedoap.federation.state import RunState, save_run_state, save_selected
from fedoap.federation.summary import make_summary
from fedoap.models import StateDict
from fedoap.runs import RunDir
from fedoap.training import evaluate
from fedoap.training.device import place, session, setup
from fedoap.training.engine import nonfinite_keys

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"


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


def _f(record: Any, key: str) -> float:
    return float(cast(Any, record[key]))


def _s(record: Any, key: str) -> str:
    return str(cast(Any, record[key]))


def config_from_yaml(text: str) -> Config:
    cfg = from_dict(Config, load_yaml(text, "fedoap-config"))
    validate(cfg)
    return cfg


# ============================================================================ client side


@dataclass
class _Site:
    """What a node builds once per process and reuses across messages."""

    cfg: Config
    alg: Algorithm
    model: torch.nn.Module
    data: ClientData  # on ``device``
    index: int
    device: torch.device


_SITES: dict[tuple[str, str, str, str], _Site] = {}


def _site(context: Context, cfg_yaml: str) -> _Site:
    """Resolve which client this node is and load its data (cached per process)."""
    cfg = config_from_yaml(cfg_yaml)
    names = [c.name for c in cfg.data.clients]
    nc = context.node_config
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
    key = (cfg.digest(), name, str(nc.get("data-path", "")), str(cfg.train.device))
    if key not in _SITES:
        spec = next(c for c in cfg.data.clients if c.name == name)
        if "data-path" in nc:  # the site's own copy of its data
            path = _s(nc, "data-path")
            spec = ClientSpec(
                **{
                    **spec.__dict__,
                    "path": path,
                    "source": "folder" if Path(path).is_dir() else "npz",
                }
            )
        device = setup(cfg.train)
        if cfg.train.compile:
            # Flower 1.42 starts a ClientApp process per message, and compiling is per process.
            warnings.warn(
                "train.compile on Flower: each ClientApp process compiles its model, and Flower "
                "starts one per message (the inductor cache on disk shortens all but the first)",
                stacklevel=2,
            )
        alg = build_algorithm(cfg)
        # Built and compiled once per process; every message of this site reuses it.
        model = place(alg.build_model(), cfg.train, device)
        data = make_client(spec, cfg.data).to(device)  # from the preprocessed cache
        _SITES[key] = _Site(cfg, alg, model, data, names.index(name), device)
    return _SITES[key]


def _load_state(context: Context) -> tuple[ClientState, dict[str, Any], StateDict, StateDict]:
    st = context.state
    if "fedoap.meta" not in st:
        raise KeyError("no client state yet")
    meta = json.loads(str(st.config_records["fedoap.meta"]["json"]))
    optim = st.array_records["fedoap.optim"].to_torch_state_dict()
    state = ClientState(
        personal=st.array_records["fedoap.personal"].to_torch_state_dict(),
        optimizers={
            k: unflatten_optimizer(optim, rest, f"{k}/") for k, rest in meta["optimizers"].items()
        },
        extra=st.array_records["fedoap.extra"].to_torch_state_dict(),
    )
    return (
        state,
        meta,
        st.array_records["fedoap.best"].to_torch_state_dict(),
        st.array_records["fedoap.best_kv"].to_torch_state_dict(),
    )


def _save_state(
    context: Context, state: ClientState, meta: dict[str, Any], best: StateDict, best_kv: StateDict
) -> None:
    optim: StateDict = {}
    rests = {}
    for name, opt_state in state.optimizers.items():
        tensors, rests[name] = flatten_optimizer(opt_state, f"{name}/")
        optim.update(tensors)
    meta = {**meta, "optimizers": rests}
    st = context.state
    st["fedoap.personal"] = ArrayRecord(state.personal)
    st["fedoap.extra"] = ArrayRecord(state.extra)
    st["fedoap.optim"] = ArrayRecord(optim)
    st["fedoap.best"] = ArrayRecord(best)
    st["fedoap.best_kv"] = ArrayRecord(best_kv)
    st["fedoap.meta"] = ConfigRecord({"json": json.dumps(meta)})


def _state_or_init(
    context: Context, site: _Site
) -> tuple[ClientState, dict[str, Any], StateDict, StateDict]:
    try:
        return _load_state(context)
    except KeyError:
        meta: dict[str, Any] = {"best_score": None, "best_round": 0, "optimizers": {}}
        return site.alg.init_client(site.model), meta, {}, {}


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
    content = RecordDict(records)
    return Message(content=content, reply_to=msg)


client_app = ClientApp(mods=[message_size_mod])


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    site = _site(context, _s(msg.content[CONFIG], "fedoap-config"))
    sizes = site.data.sizes()
    return _reply(
        msg,
        {
            METRICS: MetricRecord(
                {
                    "client-index": site.index,
                    "num-train": sizes["train"],
                    "num-val": sizes["val"],
                    "num-test": sizes["test"],
                }
            )
        },
    )


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = _site(context, _s(config, "fedoap-config"))
    state, meta, best, best_kv = _state_or_init(context, site)
    rnd = _i(config, "server-round") if "server-round" in config else _i(config, "round")
    ctx = FitContext(site.data.name, rnd, site.cfg.seed)
    bytes_in = sum(r.count_bytes() for r in msg.content.values())
    if config["stage"] == "fit":
        global_arrays = msg.content.array_records[ARRAYS].to_torch_state_dict()
        with session(site.cfg.train, site.device):
            update, state = site.alg.run_fit(site.model, global_arrays, state, site.data, ctx)
        _save_state(context, state, meta, best, best_kv)
        arrays = ArrayRecord(update.arrays)
        metrics = MetricRecord(
            {
                "num-examples": update.num_examples,
                "train-loss": update.metrics["train_loss"],
                "client-index": site.index,
                "bytes-in": bytes_in,
                "bytes-out": arrays.count_bytes(),
                "raw-bytes-out": nbytes(update.arrays),
            }
        )
        return _reply(msg, {ARRAYS: arrays, METRICS: metrics})
    if config["stage"] == "finetune":
        epoch = _i(config, "epoch")
        if epoch == 1:
            state = site.alg.start_finetune(best, state)
        # The K/V bank the best model was selected with; shared weights come from the state.
        payload = dict(best_kv)
        with session(site.cfg.train, site.device):
            loss, state = site.alg.run_finetune_epoch(
                site.model, payload, state, site.data, ctx, first=epoch == 1
            )
            row = _validate(site, payload, state, meta, rnd)
        if row["improved"]:
            best = to_device(site.model.state_dict(), torch.device("cpu"), copy=True)
            best_kv = {k: v.clone() for k, v in payload.items() if k.startswith(KV)}
        _save_state(context, state, meta, best, best_kv)
        return _reply(msg, {METRICS: MetricRecord({**_row_metrics(row, site), "train-loss": loss})})
    raise ValueError(f"unknown train stage {config['stage']!r}")


def _validate(
    site: _Site, payload: StateDict, state: ClientState, meta: dict[str, Any], rnd: int
) -> dict[str, Any]:
    t = site.cfg.train
    site.alg.personalize(site.model, payload, state)
    val = evaluate(site.model, site.data.val, t.precision, batch_size=t.eval_batch_size)
    score = val[site.cfg.train.select_metric]
    best_score = meta["best_score"]
    improved = score is not None and (best_score is None or score > best_score)
    if improved:
        meta["best_score"], meta["best_round"] = score, rnd
    return {"improved": improved, **val}


def _row_metrics(row: dict[str, Any], site: _Site) -> dict[str, Any]:
    return {
        "client-index": site.index,
        "val-dice": row["dice"],
        "val-case-dice": row["case_dice"],
        "improved": _i(row, "improved"),
        "num-examples": len(site.data.val),
    }


@client_app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    site = _site(context, _s(config, "fedoap-config"))
    state, meta, best, best_kv = _state_or_init(context, site)
    if config["stage"] == "val":
        global_arrays = msg.content.array_records[ARRAYS].to_torch_state_dict()
        rnd = _i(config, "server-round")
        with session(site.cfg.train, site.device):
            row = _validate(site, global_arrays, state, meta, rnd)
        if row["improved"]:
            best = to_device(site.model.state_dict(), torch.device("cpu"), copy=True)
            best_kv = {k: v.clone() for k, v in global_arrays.items() if k.startswith(KV)}
        _save_state(context, state, meta, best, best_kv)
        return _reply(msg, {METRICS: MetricRecord(_row_metrics(row, site))})
    if config["stage"] == "test":
        site.model.load_state_dict(best)
        cast(Any, site.model).set_kv_bank(best_kv.get(KV + "bank"))
        t = site.cfg.train
        with session(t, site.device):
            test = evaluate(
                site.model, site.data.test, t.precision, full=True, batch_size=t.eval_batch_size
            )
        out = Path(str(context.node_config.get("output-dir", config["run-dir"])))
        save_selected(RunDir(out), site.data.name, best, best_kv, meta["best_round"], site.alg.name)
        values = {k: (float("nan") if v is None else float(v)) for k, v in test.items()}
        return _reply(
            msg,
            {
                METRICS: MetricRecord(
                    {
                        "client-index": site.index,
                        "best-round": meta["best_round"],
                        "best-val": _f(meta, "best_score"),
                        "num-examples": len(site.data.test),
                        **values,
                    }
                )
            },
        )
    raise ValueError(f"unknown evaluate stage {config['stage']!r}")


# ============================================================================ server side


@dataclass
class ServerLog:
    """What the server learns from replies; becomes metrics.csv and summary.json."""

    names: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    train_loss: dict[tuple[int, int], float] = field(default_factory=dict)
    received_keys: list[set[str]] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: list[int] = field(default_factory=list)
    flower_bytes_up: list[int] = field(default_factory=list)
    flower_bytes_down: list[int] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    # Replies refused by check_upload: {"round", "client", "reason"} each.
    refused: list[dict[str, Any]] = field(default_factory=list)


class FedoapStrategy(FedAvg):
    """Flower's FedAvg loop with aggregation delegated to a fedoap :class:`Algorithm`.

    Sampling follows :func:`fedoap.federation.runner.sample_clients`, so a round trains the same
    clients on either runtime.
    """

    def __init__(
        self,
        alg: Algorithm,
        cfg: Config,
        nodes: dict[int, int],
        log: ServerLog,
        run_dir: Path,
        template: Template,
        train_sizes: dict[int, int],
    ) -> None:
        k = len(cfg.data.clients)
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=k,
            min_available_nodes=k,
        )
        self.alg, self.cfg, self.log, self.run_dir = alg, cfg, log, run_dir
        self.template, self.train_sizes = template, train_sizes
        self.node_of = {idx: node for node, idx in nodes.items()}
        self.index_of = dict(nodes)  # node id -> client index
        self.server: StateDict = {}
        self.global_arrays: StateDict = {}
        self.t_round = time.perf_counter()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):  # type: ignore[override]
        self.t_round = time.perf_counter()
        self.global_arrays = arrays.to_torch_state_dict()
        names = self.log.names
        sampled = sample_clients(names, self.cfg.federation.fraction, self.cfg.seed, server_round)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.log.bytes_down += [nbytes(self.global_arrays)] * len(sampled)
        self.log.flower_bytes_down += [arrays.count_bytes()] * len(sampled)
        return [
            Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)
            for node in (self.node_of[names.index(n)] for n in sampled)
        ]

    def aggregate_train(self, server_round: int, replies):  # type: ignore[override]
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        if errors:
            raise RuntimeError(
                f"{len(errors)} client(s) failed in round {server_round}: "
                + "; ".join(client_error(str(m.error.reason)) for m in errors)
            )
        received = []
        # Which site sent a reply comes from Flower's routing (the node it came from), not from
        # what the reply says about itself.
        for m in sorted(replies, key=lambda m: self.index_of.get(m.metadata.src_node_id, -1)):
            idx = self.index_of.get(m.metadata.src_node_id)
            if idx is None:
                self._refuse(server_round, f"node {m.metadata.src_node_id}", "unknown node")
                continue
            try:
                record, metrics = m.content.array_records[ARRAYS], m.content[METRICS]
                arrays = record.to_torch_state_dict()
                raw_bytes = _i(metrics, "raw-bytes-out")
            except (KeyError, TypeError, ValueError) as err:
                why = f"the reply lacks its {ARRAYS} or {METRICS} record ({err!r})"
                self._refuse(server_round, self.log.names[idx], why)
                continue
            self.log.received_keys.append(set(arrays))
            self.log.bytes_up.append(raw_bytes)
            self.log.flower_bytes_up.append(record.count_bytes())
            received.append((idx, arrays, metrics.get("num-examples"), metrics.get("train-loss")))
        new, loss = self.aggregate_checked(server_round, received)
        # Only what a real server holds, the global weights: personal state stays at the sites.
        save_run_state(
            RunDir(self.run_dir),
            RunState(self.cfg.digest(), new, done=server_round, runtime="flower"),
        )
        return ArrayRecord(new), MetricRecord({"train-loss": loss})

    def _refuse(self, server_round: int, site: str, reason: str) -> None:
        self.log.refused.append({"round": server_round, "client": site, "reason": reason})
        print(f"warning: round {server_round}: refused site '{site}''s update: {reason}")

    def aggregate_checked(
        self, server_round: int, received: list[tuple[int, StateDict, Any, Any]]
    ) -> tuple[StateDict, float]:
        """The new global arrays from the replies (client index, arrays, num-examples,
        train-loss) that pass :func:`check_upload`; refused ones are logged and recorded. With
        none accepted the global arrays stay as they were. Returns them and the mean loss."""
        updates: list[Update] = []
        losses: list[float] = []
        for idx, arrays, n, loss in received:
            reason = check_upload(arrays, n, self.template, self.train_sizes.get(idx))
            if reason is None and not (isinstance(loss, (int, float)) and math.isfinite(loss)):
                reason = f"train-loss {loss!r} is not a finite number"
            if reason is not None:
                self._refuse(server_round, self.log.names[idx], reason)
                continue
            self.log.train_loss[(server_round, idx)] = float(loss)
            losses.append(float(loss))
            updates.append(Update(arrays, int(n)))
        if not updates:
            return dict(self.global_arrays), math.nan
        new = self.alg.aggregate(self.global_arrays, updates, self.server)
        bad = nonfinite_keys(new)
        if bad:  # every upload was finite: the server step itself diverged
            raise DivergedError(
                f"round {server_round}: the aggregated global model is not finite (e.g. {bad[0]})",
                round=server_round,
                stage="aggregate",
            )
        return new, float(np.mean(losses))

    def aggregate_evaluate(self, server_round: int, replies):  # type: ignore[override]
        replies = list(replies)
        valid = [m for m in replies if not m.has_error()]
        errors = [m for m in replies if m.has_error()]
        if errors:
            raise RuntimeError(f"{len(errors)} client(s) failed evaluation in round {server_round}")
        sampled = set(
            sample_clients(
                self.log.names, self.cfg.federation.fraction, self.cfg.seed, server_round
            )
        )
        self.log.rows += _rows(valid, self.log, server_round, "federated", sampled)
        self.log.round_seconds.append(time.perf_counter() - self.t_round)
        return MetricRecord(
            {"val-dice": float(np.mean([_f(m.content[METRICS], "val-dice") for m in valid]))}
        )


def _rows(
    replies: list[Message], log: ServerLog, rnd: int, stage: str, sampled: set[str]
) -> list[dict[str, Any]]:
    rows = []
    for m in sorted(replies, key=lambda m: _i(m.content[METRICS], "client-index")):
        r = m.content[METRICS]
        idx = _i(r, "client-index")
        name = log.names[idx]
        loss = r.get("train-loss", log.train_loss.get((rnd, idx)))
        rows.append(
            {
                "round": rnd,
                "stage": stage,
                "client": name,
                "sampled": int(name in sampled),
                "train_loss": None if loss is None else float(cast(Any, loss)),
                "val_dice": _f(r, "val-dice"),
                "val_case_dice": _f(r, "val-case-dice"),
                "best": _i(r, "improved"),
                "seconds": None,
            }
        )
    return rows


def _send(
    grid: Grid,
    cfg_record: ConfigRecord,
    nodes: list[int],
    kind: str,
    arrays: ArrayRecord | None = None,
) -> list[Message]:
    content = {CONFIG: cfg_record} if arrays is None else {CONFIG: cfg_record, ARRAYS: arrays}
    msgs = [
        Message(content=RecordDict(cast(Any, content)), message_type=kind, dst_node_id=n)
        for n in nodes
    ]
    replies = list(grid.send_and_receive(msgs, timeout=3600))
    failed = [m for m in replies if m.has_error()]
    if failed or len(replies) != len(nodes):
        reasons = "; ".join(client_error(str(m.error.reason)) for m in failed)
        raise RuntimeError(
            f"{kind}: {len(replies) - len(failed)} of {len(nodes)} replies ({reasons})"
        )
    return replies


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_dir = Path(_s(context.run_config, "run-dir"))
    rd = RunDir(run_dir)
    cfg_yaml = rd.config.read_text()
    cfg = config_from_yaml(cfg_yaml)
    alg = build_algorithm(cfg)
    reason = unsupported_reason(alg)
    if reason:
        raise ConfigError(f"method {cfg.method} cannot run on Flower: {reason}")
    t0 = time.perf_counter()
    names = [c.name for c in cfg.data.clients]
    base = {"fedoap-config": cfg_yaml, "run-dir": str(run_dir.resolve())}
    # Wait for every client, then learn which node is which client.
    deadline = time.time() + 600
    while len(list(grid.get_node_ids())) < len(names):
        if time.time() > deadline:
            raise RuntimeError(
                f"only {len(list(grid.get_node_ids()))} of {len(names)} nodes connected"
            )
        time.sleep(0.5)
    node_ids = list(grid.get_node_ids())
    info = _send(grid, ConfigRecord(base), node_ids, MessageType.QUERY)
    nodes = {m.metadata.src_node_id: _i(m.content[METRICS], "client-index") for m in info}
    if sorted(nodes.values()) != list(range(len(names))):
        raise RuntimeError(
            f"nodes report client indices {sorted(nodes.values())}, expected 0..{len(names) - 1}"
        )
    sizes = {
        names[i]: {s: _i(m.content[METRICS], f"num-{s}") for s in ("train", "val", "test")}
        for m in info
        for i in [_i(m.content[METRICS], "client-index")]
    }

    log = ServerLog(names)
    model = alg.build_model()
    train_sizes = {names.index(n): s["train"] for n, s in sizes.items()}
    strategy = FedoapStrategy(
        alg, cfg, nodes, log, run_dir, alg.upload_template(model), train_sizes
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(alg.init_global(model)),
        num_rounds=cfg.federation.rounds,
        train_config=ConfigRecord({**base, "stage": "fit"}),
        evaluate_config=ConfigRecord({**base, "stage": "val"}),
    )
    ft_epochs = cfg.finetune.epochs if alg.has_finetune else 0
    all_nodes = sorted(nodes, key=lambda n: nodes[n])
    for e in range(1, ft_epochs + 1):
        rnd = cfg.federation.rounds + e
        replies = _send(
            grid,
            ConfigRecord({**base, "stage": "finetune", "epoch": e, "round": rnd}),
            all_nodes,
            MessageType.TRAIN,
        )
        log.rows += _rows(replies, log, rnd, "finetune", set(names))
    replies = _send(grid, ConfigRecord({**base, "stage": "test"}), all_nodes, MessageType.EVALUATE)
    clients = {}
    for m in sorted(replies, key=lambda m: _i(m.content[METRICS], "client-index")):
        r = m.content[METRICS]
        name = names[_i(r, "client-index")]
        test = {
            k: (None if isinstance(r[k], float) and math.isnan(cast(float, r[k])) else r[k])
            for k in ("dice", "iou", "hd95_px", "case_dice", "hd95_pairs", "n_images", "n_cases")
        }
        clients[name] = {
            "n": sizes[name],
            "best_round": _i(r, "best-round"),
            "best_stage": "federated"
            if _i(r, "best-round") <= cfg.federation.rounds
            else "finetune",
            "val": {cfg.train.select_metric: _f(r, "best-val")},
            "test": test,
        }
    kv_bytes = nbytes({k: v for k, v in strategy.global_arrays.items() if k.startswith(KV)})
    summary = make_summary(
        cfg,
        alg,
        model,
        clients,
        log.bytes_up,
        log.bytes_down,
        kv_bytes,
        time.perf_counter() - t0,
        log.round_seconds,
        ft_epochs,
    )
    summary["runtime"] = "flower"
    if log.refused:
        summary["refused"] = log.refused
    summary["comm"]["flower_bytes_up_per_round"] = (
        int(np.mean(log.flower_bytes_up)) if log.flower_bytes_up else 0
    )
    summary["comm"]["flower_bytes_down_per_round"] = (
        int(np.mean(log.flower_bytes_down)) if log.flower_bytes_down else 0
    )
    rd.write_metrics(log.rows)
    rd.write_json(rd.root / "flower_received_keys.json", [sorted(k) for k in log.received_keys])
    from fedoap.plots import plot_curves

    plot_curves(log.rows, rd.plots, f"{alg.name} on Flower (seed {cfg.seed})")
    # Last: summary.json marks the run complete (RunDir.is_complete).
    rd.write_json(rd.summary, summary)
    rd.remove_stale_temporaries()


__all__ = ["client_app", "server_app", "unsupported_reason"]
