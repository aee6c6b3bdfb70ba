"""What fedoap's Flower messages carry, and how it goes into Flower's records and back.

Every message is a ``RecordDict`` (Flower 1.42 Message API):

* **query** (server -> node): a ConfigRecord ``config`` with the resolved fedoap config
  (``fedoap-config``, YAML) and the server's run folder (``run-dir``). The reply is the node's
  claim, one MetricRecord ``metrics``: ``client-index`` (which configured site it is) and its
  split sizes ``num-train``, ``num-val``, ``num-test``.
* **train** (server -> node, one per site per step): the same ConfigRecord plus ``step`` (the
  :class:`~fedoap.federation.site.Step` as JSON), and the global arrays as the ArrayRecord
  ``arrays`` when the step validates or trains. The reply is a ConfigRecord ``config`` whose
  ``result`` is JSON (validation rows, the test entry, seconds per phase) and, when the site
  trained, its upload: one ArrayRecord ``arrays`` (namespaced ``shared.*`` / ``kv.*`` keys) and
  one MetricRecord ``metrics`` (``num-examples``, ``train-loss``, ``bytes-out``). Flower's reply
  validation and its DP mods accept exactly one ArrayRecord and one MetricRecord per reply.

This module needs Flower and the standard library only: the ClientApp relay Flower starts for
every message (:mod:`fedoap.federation.flower_client`) imports it, and must not pay for PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from fedoap.config import Config

ARRAYS, METRICS, CONFIG, RESULT = "arrays", "metrics", "config", "result"
SPLITS = ("train", "val", "test")


def int_of(record: Any, key: str) -> int:
    """An int from a Flower record (their values are typed as a wide union)."""
    return int(cast(Any, record[key]))


def str_of(record: Any, key: str) -> str:
    """A str from a Flower record."""
    return str(cast(Any, record[key]))


def plain(record: Any) -> dict[str, Any]:
    """A Flower record (or a node config) as a dict with str keys."""
    return {str(k): v for k, v in record.items()}


def config_from_yaml(text: str) -> Config:
    """The resolved fedoap config a message carries (``fedoap-config``), validated."""
    # Imported here: the relay imports this module per message and never reads the config.
    from fedoap.config import Config, from_dict, load_yaml, validate

    cfg = from_dict(Config, load_yaml(text, "fedoap-config"))
    validate(cfg)
    return cfg


def reply(msg: Message, records: Mapping[str, Any]) -> Message:
    return Message(content=RecordDict(dict(records)), reply_to=msg)


def message_bytes(m: Message) -> int:
    """A message's payload bytes as Flower counts them."""
    return sum(r.count_bytes() for r in m.content.values())


# ------------------------------------------------------------------ query


def query_message(base: Mapping[str, str], node: int) -> Message:
    return Message(
        content=RecordDict({CONFIG: ConfigRecord(dict(base))}),
        message_type=MessageType.QUERY,
        dst_node_id=node,
    )


def claim(index: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """A node's answer to the query: which configured site it is, and its split sizes."""
    return {"client-index": index, **{f"num-{s}": sizes[s] for s in SPLITS}}


def claim_reply(msg: Message, claimed: Mapping[str, Any]) -> Message:
    return reply(msg, {METRICS: MetricRecord(cast(Any, dict(claimed)))})


def read_claim(m: Message) -> tuple[Any, dict[str, Any]]:
    """A query reply's claim as sent, unchecked: (``client-index``, {split: size}). Raises
    KeyError, TypeError or AttributeError where the reply has no such record."""
    r = m.content.metric_records[METRICS]
    return r.get("client-index"), {s: r.get(f"num-{s}") for s in SPLITS}


# ------------------------------------------------------------------ step


def step_message(
    base: Mapping[str, str], step: Mapping[str, Any], arrays: ArrayRecord | None, node: int
) -> Message:
    """A step for one node: the step (as ``dataclasses.asdict`` gives it) in the ConfigRecord,
    and ``arrays`` (the global arrays) when the step needs them."""
    content: dict[str, Any] = {CONFIG: ConfigRecord({**base, "step": json.dumps(step)})}
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content=RecordDict(content), message_type=MessageType.TRAIN, dst_node_id=node)


def received_config(msg: Message) -> dict[str, Any]:
    """The ConfigRecord of a query or a step, as a dict."""
    return plain(msg.content[CONFIG])


def received_arrays(msg: Message) -> dict[str, torch.Tensor]:
    """A step's global arrays as PyTorch tensors ({} when it carries none)."""
    if ARRAYS not in msg.content.array_records:
        return {}
    return msg.content.array_records[ARRAYS].to_torch_state_dict()


def received_numpy(msg: Message) -> dict[str, np.ndarray]:
    """A step's global arrays as numpy arrays ({} when it carries none)."""
    if ARRAYS not in msg.content.array_records:
        return {}
    return {k: v.numpy() for k, v in msg.content.array_records[ARRAYS].items()}


def numpy_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord | None:
    """Numpy arrays as an ArrayRecord (None when there are none)."""
    return ArrayRecord({k: Array(v) for k, v in arrays.items()}) if arrays else None


def step_records(
    result: str, upload: ArrayRecord | None, num_examples: int, train_loss: float
) -> dict[str, Any]:
    """A step's reply records: the result (JSON) and, when the site trained, its upload."""
    records: dict[str, Any] = {CONFIG: ConfigRecord({RESULT: result})}
    if upload is not None:
        records[ARRAYS] = upload
        records[METRICS] = MetricRecord(
            {
                "num-examples": num_examples,
                "train-loss": train_loss,
                "bytes-out": upload.count_bytes(),
            }
        )
    return records


def read_result(m: Message) -> Any:
    """A step reply's result as the site sent it (JSON), unchecked. Raises KeyError, TypeError
    or ValueError where it has none."""
    return json.loads(str_of(m.content.config_records[CONFIG], RESULT))


def read_upload(m: Message) -> tuple[dict[str, torch.Tensor], Any, Any] | None:
    """A step reply's upload as sent, unchecked: (arrays, ``num-examples``, ``train-loss``), or
    None when the site did not train. Raises KeyError, TypeError or ValueError where the upload
    lacks a record."""
    if ARRAYS not in m.content.array_records:
        return None
    arrays = m.content.array_records[ARRAYS].to_torch_state_dict()
    metrics = m.content.metric_records[METRICS]
    return arrays, metrics.get("num-examples"), metrics.get("train-loss")
