"""The run state's one owner (fedoap.federation.state): what it writes is what it reads back,
and a file that lacks what a reader needs is refused with the file's name."""

from __future__ import annotations

import math

import pytest
import torch

from fedoap.basetypes import ClientState
from fedoap.errors import CheckpointError
from fedoap.federation.state import (
    RunState,
    SiteState,
    load_run_state,
    load_selected,
    load_site_state,
    runtime_of,
    save_run_state,
    save_selected,
    save_site_state,
    site_state_dir,
)
from fedoap.runs import RunDir


def sample_state() -> RunState:
    opt = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    site = SiteState(
        ClientState(personal={"head.w": torch.arange(4.0)}, optimizers={"fit": opt}),
        best_weights={"head.w": torch.zeros(4), "enc.w": torch.ones(2)},
        best_kv={"kv.bank": torch.full((3, 2), 0.5)},
        best_score=0.75,
        best_round=2,
    )
    fresh = SiteState(ClientState(personal={"head.w": torch.zeros(4)}))  # never validated
    history = {
        "elapsed": 12.5,
        "rows": [{"round": 1}],
        "round_seconds": [6.0],
        "bytes_up": [10],
        "bytes_down": [10],
        "phases": {"train": 9.0},
    }
    return RunState(
        "abc123",
        {"shared.enc.w": torch.ones(2)},
        server={"m.enc.w": torch.zeros(2)},
        sites={"a": site, "b": fresh},
        stage="finetune",
        done=1,
        history=history,
    )


def test_what_is_saved_is_what_is_read_back(tmp_path):
    rd = RunDir(tmp_path)
    rs = sample_state()
    save_run_state(rd, rs)
    back = load_run_state(rd, "abc123", ["a", "b"])
    assert (back.stage, back.done, back.runtime, back.history) == (
        "finetune",
        1,
        "inprocess",
        rs.history,
    )
    assert torch.equal(back.global_arrays["shared.enc.w"], torch.ones(2))
    assert torch.equal(back.server["m.enc.w"], torch.zeros(2))
    a = back.sites["a"]
    assert (a.best_score, a.best_round) == (0.75, 2)
    assert torch.equal(a.best_kv["kv.bank"], rs.sites["a"].best_kv["kv.bank"])
    assert torch.equal(a.state.optimizers["fit"]["state"][0]["exp_avg"], torch.ones(2))
    assert a.state.optimizers["fit"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert back.sites["b"].best_score == -math.inf  # "never validated" survives the JSON
    assert runtime_of(rd) == "inprocess"


def test_a_reader_gets_a_clear_error_naming_the_file(tmp_path):
    rd = RunDir(tmp_path)
    save_run_state(rd, sample_state())
    with pytest.raises(CheckpointError, match="different config"):
        load_run_state(rd, "other")
    with pytest.raises(
        CheckpointError, match=r"last.safetensors: no state for client\(s\) \['c'\]"
    ):
        load_run_state(rd, "abc123", ["a", "c"])
    assert runtime_of(RunDir(tmp_path / "none")) is None


def test_a_flower_server_state_holds_no_site_state(tmp_path):
    rd = RunDir(tmp_path)
    history = sample_state().history
    rs = RunState("abc123", {"shared.w": torch.ones(2)}, done=3, history=history, runtime="flower")
    save_run_state(rd, rs)
    back = load_run_state(rd, "abc123", ["a"])  # no site state is asked of a server's file
    assert (back.runtime, back.done, back.sites, back.history) == ("flower", 3, {}, history)
    assert runtime_of(rd) == "flower"
    save_run_state(rd, RunState("abc123", {"shared.w": torch.ones(2)}, runtime="flower"))
    with pytest.raises(CheckpointError, match="lacks a valid 'elapsed'"):
        load_run_state(rd)  # a server's history is what --resume continues


def test_a_site_resumes_from_its_last_step_before_the_one_asked(tmp_path):
    """A site's own step files: the state before step k is the latest file below k (a resumed
    server repeats its last step; a site that was down missed some), the last three are kept,
    and a redone step replaces the files of the steps after it."""
    rd = RunDir(tmp_path)
    site = sample_state().sites["a"]
    assert load_site_state(rd, "a", before=1) is None
    for step in range(1, 6):
        site.best_round = step
        save_site_state(rd, "a", step, site, {"rows": [{"round": step}]})
    kept = sorted(p.name for p in site_state_dir(rd, "a").iterdir())
    assert kept == [f"step-00000{k}.safetensors" for k in (3, 4, 5)]
    found = load_site_state(rd, "a", before=5)
    assert found is not None
    step, back, meta = found
    assert (step, back.best_round, meta["rows"]) == (4, 4, [{"round": 4}])
    assert torch.equal(back.state.optimizers["fit"]["state"][0]["exp_avg"], torch.ones(2))
    save_site_state(rd, "a", 4, back, {"rows": []})  # step 4 redone: step 5 is stale
    found = load_site_state(rd, "a", before=99)
    assert found is not None and found[0] == 4


def test_a_selected_model_keeps_its_kv_bank_apart(tmp_path):
    rd = RunDir(tmp_path)
    save_selected(rd, "a", {"w": torch.ones(2)}, {"kv.bank": torch.zeros(3, 2)}, 4, "fedoap", "d1")
    weights, kv = load_selected(rd, "a", "d1")
    assert set(weights) == {"w"} and set(kv) == {"kv.bank"}
    with pytest.raises(CheckpointError, match=r"a\.safetensors: comes from a run of another"):
        load_selected(rd, "a", "d2")
