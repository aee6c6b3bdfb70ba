import math

import pytest
import torch

from fedoap.models import FedOAPNet, Partition
from fedoap.models.attention import SharedKVAttention
from fedoap.models.blocks import NORM_TYPES
from fedoap.models.partition import keys_of_children, keys_of_type

KINDS = ["cross", "self", "none"]


def tiny(attention="cross", **kw):
    torch.manual_seed(0)
    args = dict(in_channels=1, width=4, depth=3, heads=2, attention=attention)
    args.update(kw)
    return FedOAPNet(**args)


@pytest.mark.parametrize("attention", KINDS)
@pytest.mark.parametrize("adapter", [True, False])
@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_output_shape(attention, adapter, norm):
    model = tiny(attention, use_adapter=adapter, norm=norm)
    x = torch.randn(2, 1, 32, 48)
    assert model(x).shape == (2, 1, 32, 48)


def test_rgb_input_and_depth():
    model = FedOAPNet(in_channels=3, width=4, depth=4, heads=4)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_bad_input_shape_says_what_to_use():
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny()(torch.randn(1, 1, 30, 32))


@pytest.mark.parametrize("attention", KINDS)
@pytest.mark.parametrize("bank", [False, True])
def test_every_parameter_gets_a_gradient(attention, bank):
    model = tiny(attention)
    if bank and attention != "none":
        model.set_kv_bank(torch.randn(5, model.bottleneck_channels))
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


def test_reference_width_has_the_papers_parameter_count():
    # method.md: w = 64 gives 49.5 M parameters in all.
    model = FedOAPNet(in_channels=1, width=64, depth=4, heads=1)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - 49.5) < 0.05


def test_flops_scale_with_resolution():
    model = tiny()
    f32, f64 = model.flops_per_image(32), model.flops_per_image(64)
    assert f32 > 0
    assert 3.5 < f64 / f32 < 4.5  # convolutions dominate: ~4x pixels, ~4x FLOPs


def test_attention_matches_hand_computation():
    torch.manual_seed(0)
    b, n, m, c, h = 2, 5, 7, 8, 2
    att = SharedKVAttention(c, h)
    q, kv, res = torch.randn(b, n, c), torch.randn(b, m, c), torch.randn(b, n, c)
    k, v = att.k_proj(kv), att.v_proj(kv)
    d = c // h
    heads = []
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        heads.append(w @ v[..., sl])
    expected = att.norm(att.o_proj(torch.cat(heads, -1)) + res)
    torch.testing.assert_close(att(q, kv, res), expected, rtol=1e-5, atol=1e-5)


def test_num_heads_is_actually_used():
    torch.manual_seed(0)
    a1, a2 = SharedKVAttention(8, 1), SharedKVAttention(8, 4)
    a2.load_state_dict(a1.state_dict())
    q, kv = torch.randn(1, 5, 8), torch.randn(1, 6, 8)
    assert not torch.allclose(a1(q, kv, q), a2(q, kv, q))


def test_bank_changes_the_output_and_is_validated():
    model = tiny().eval()
    x = torch.randn(1, 1, 32, 32)
    plain = model(x)
    model.set_kv_bank(torch.randn(3, model.bottleneck_channels) * 5)
    assert not torch.allclose(plain, model(x))
    with pytest.raises(ValueError, match="kv bank must have shape"):
        model.set_kv_bank(torch.randn(3, 7))
    assert "kv_bank" not in model.state_dict()


def test_partition_by_module_structure():
    model = tiny()
    personal = keys_of_children(model, ("bottleneck", "query_proj", "adapter", "head"))
    part = Partition.from_personal(model, personal)
    assert set(part.shared) | set(part.personal) == set(model.state_dict())
    assert not set(part.shared) & set(part.personal)
    top = {k.split(".")[0] for k in part.personal}
    assert top == {"bottleneck", "query_proj", "adapter", "head"}
    assert {k.split(".")[0] for k in part.shared} == {
        "encoder",
        "kv_bottleneck",
        "attention",
        "decoder",
    }
    counts = part.count(model)
    assert counts["shared"] + counts["personal"] == sum(p.numel() for p in model.parameters())


def test_norm_keys_by_type_not_by_name():
    model = tiny(norm="batch")
    keys = keys_of_type(model, NORM_TYPES)
    assert keys and all(
        isinstance(model.get_submodule(k.rsplit(".", 1)[0]), NORM_TYPES) for k in keys
    )
    assert any(k.endswith("running_mean") for k in keys)
    # The attention's LayerNorm counts as a norm, the convs do not.
    assert "attention.norm.weight" in keys
    assert "encoder.stages.0.0.weight" not in keys  # the first conv
