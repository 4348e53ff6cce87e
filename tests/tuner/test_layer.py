"""HPRModel / HPRLayer: injection on real tiny architectures, identity init, the edit itself, unload."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from hpr_peft import HPRConfig, HPRLayer
from hpr_peft.tuner.layer import build_angle_net, flag_tokens, predict_angle
from support.hpr import edited_fraction, random_hpr_model, token_ids
from support.models import make_tiny_causal_lm


def test_edit_is_the_pseudo_rotation_of_flagged_tokens():
    """Block output vs. the unedited block output: flagged tokens rotate by exactly alpha*f(h) in the
    (h, w) plane toward +w with the norm kept; all other tokens are bit-identical."""
    model = random_hpr_model("llama", target_layers=[1], alpha=0.7)
    layer = model.base_model.hpr_layers()[1]
    ids = token_ids(batch=3, seq=10, seed=4)
    with torch.no_grad():
        edited = model(ids, output_hidden_states=True).hidden_states[2]
        with model.disable_adapter():
            plain = model(ids, output_hidden_states=True).hidden_states[2]
        w = layer.hpr_probe["default"].weight[0]
        scores = plain @ w
        flagged = flag_tokens(scores, 0.5)
        flagged[:, 0] = False  # sequence start
        theta = 0.7 * predict_angle(layer.hpr_angle["default"], plain)

    assert flagged.float().mean() > 0.2
    assert torch.equal(edited[~flagged], plain[~flagged])
    h, h2 = plain[flagged].double(), edited[flagged].double()
    torch.testing.assert_close(h2.norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=0)
    cos = (h * h2).sum(-1) / (h.norm(dim=-1) * h2.norm(dim=-1))
    torch.testing.assert_close(torch.arccos(cos.clamp(-1, 1)), theta[flagged].double(), atol=2e-3, rtol=0)
    # in the plane of h and w, moving toward the positive side
    w64 = w.double()
    for row_h, row_h2 in zip(h, h2, strict=True):
        basis = torch.stack([row_h, w64], dim=1)  # (d, 2)
        coeffs = torch.linalg.lstsq(basis, row_h2).solution
        torch.testing.assert_close(basis @ coeffs, row_h2, atol=1e-5 * row_h.norm().item(), rtol=0)
    assert ((h2 @ w64) > (h @ w64)).all()
    assert theta[flagged].min() > 0.3  # random editors rotate by large angles


def test_sequence_start_is_skipped_unless_configured():
    ids = token_ids(batch=4, seq=8, seed=2)
    skipping = random_hpr_model("llama", target_layers=[1], threshold=0.99)
    with torch.no_grad():
        edited = skipping(ids, output_hidden_states=True).hidden_states[2]
        with skipping.disable_adapter():
            plain = skipping(ids, output_hidden_states=True).hidden_states[2]
    changed = (edited != plain).any(-1)
    assert not changed[:, 0].any() and changed[:, 1:].all()

    editing = random_hpr_model("llama", target_layers=[1], threshold=0.99, skip_sequence_start=False)
    with torch.no_grad():
        edited = editing(ids, output_hidden_states=True).hidden_states[2]
    assert (edited != plain).any(-1).all()


def test_edit_visible_even_if_capture_hooks_were_installed_before_wrapping():
    base = make_tiny_causal_lm("llama")
    ids = token_ids()
    with torch.no_grad():
        plain = base(ids, output_hidden_states=True).hidden_states  # installs transformers' capture hooks
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers=[1], init_weights=False))
    with torch.no_grad():
        edited = model(ids, output_hidden_states=True).hidden_states
    assert torch.equal(edited[1], plain[1])  # block 0 untouched
    assert (edited[2] != plain[2]).any(-1).float().mean() > 0.2  # block 1 output edited


def test_angle_net_runs_only_on_flagged_tokens():
    model = random_hpr_model("llama", target_layers=[1])
    layer = model.base_model.hpr_layers()[1]
    rows: list[int] = []
    handle = layer.hpr_angle["default"].register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    ids = token_ids(batch=2, seq=12, seed=3)
    fraction = edited_fraction(model, ids, layer=1)
    handle.remove()
    assert rows == [round(fraction * ids.numel())]
    assert 0 < rows[0] < ids.numel()


def test_tuple_returning_block_is_supported():
    """Older transformers / remote code return (hidden, extras...): the extras pass through untouched."""

    class TupleBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, hidden, flag=None):
            return self.linear(hidden), ("extra", flag)

    torch.manual_seed(0)
    block = TupleBlock()
    config = HPRConfig(target_layers=[0], init_weights=False, threshold=0.99)
    layer = HPRLayer(block, "default", config, hidden_size=8, layer_index=0)
    x = torch.randn(2, 5, 8)
    out = layer(x, flag=7)
    plain = block.linear(x)
    assert isinstance(out, tuple) and out[1] == ("extra", 7)
    assert torch.equal(out[0][:, 0], plain[:, 0])  # sequence start
    assert (out[0][:, 1:] != plain[:, 1:]).any(-1).all()
    layer.detach_edit_hook()
    assert torch.equal(block(x)[0], plain)


def test_set_editor_installs_weights_and_validates():
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[2]))
    layer = model.base_model.hpr_layers()[2]
    d = layer.hidden_size
    net = build_angle_net(d, [d // 2])
    w = torch.randn(d)
    layer.set_editor("default", w, net.state_dict())
    assert torch.equal(layer.hpr_probe["default"].weight[0], w)
    for name, tensor in layer.hpr_angle["default"].state_dict().items():
        assert torch.equal(tensor, net.state_dict()[name])
    assert not layer.is_identity("default")
    with pytest.raises(ValueError, match=r"probe_weight must have shape \(32,\)"):
        layer.set_editor("default", torch.randn(d + 1), net.state_dict())
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.set_editor("default", torch.full((d,), math.nan), net.state_dict())
    with pytest.raises(ValueError, match="angle_state_dict keys"):
        layer.set_editor("default", w, build_angle_net(d, [4, 4]).state_dict())
    with pytest.raises(ValueError, match="Adapter 'nope' does not exist"):
        layer.set_editor("nope", w, net.state_dict())


def test_predict_angle_range_and_dtype():
    net = build_angle_net(16, [])
    assert len(net) == 1
    with torch.no_grad():
        net[0].bias.fill_(50.0)
    angle = predict_angle(net.to(torch.bfloat16), torch.randn(3, 4, 16))
    assert angle.shape == (3, 4) and angle.dtype == torch.float32
    assert torch.all(angle <= math.pi) and torch.all(angle > 3.0)


def test_flag_tokens_rule():
    scores = torch.tensor([-2.0, 0.0, 1e-8, 3.0])
    assert flag_tokens(scores, 0.5).tolist() == [True, True, False, False]
    assert flag_tokens(scores, 0.2).tolist() == [True, False, False, False]
    assert flag_tokens(scores, 0.9).tolist() == [True, True, True, False]


def test_target_errors_are_clear():
    with pytest.raises(ValueError, match=r"target_layers \[4, 7\] out of range.*4 decoder blocks"):
        get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 4, 7]))
    with pytest.raises(ValueError, match="'all-linear' is not supported"):
        HPRConfig(target_layers="all-linear")

    class NotALanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="Cannot find the decoder blocks"):
        get_peft_model(NotALanguageModel(), HPRConfig(target_layers=[0]))


def test_merging_is_refused_with_an_explanation():
    model = random_hpr_model("llama")
    with pytest.raises(NotImplementedError, match="depends on the input"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="depends on the input"):
        model.base_model.merge_adapter()
    with pytest.raises(NotImplementedError, match="depends on the input"):
        model.base_model.hpr_layers()[1].merge()
    # still intact and editing afterwards
    assert edited_fraction(model, token_ids(), layer=1) > 0.2


def test_adapter_weights_follow_base_dtype_and_placement():
    base = make_tiny_causal_lm("llama").to(torch.bfloat16)
    model = get_peft_model(base, HPRConfig(target_layers=[1]), autocast_adapter_dtype=False)
    layer = model.base_model.hpr_layers()[1]
    assert layer.hpr_probe["default"].weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in layer.hpr_angle["default"].parameters())

    base = make_tiny_causal_lm("llama").to(torch.bfloat16)
    model = get_peft_model(base, HPRConfig(target_layers=[1]))  # peft's default: adapters upcast to fp32
    layer = model.base_model.hpr_layers()[1]
    assert layer.hpr_probe["default"].weight.dtype == torch.float32


def test_low_cpu_mem_usage_creates_meta_weights():
    base = make_tiny_causal_lm("llama")
    ids = token_ids()
    with torch.no_grad():
        reference = base(ids).logits
    model = get_peft_model(base, HPRConfig(target_layers=[1, 2], init_weights=False), low_cpu_mem_usage=True)
    layer = model.base_model.hpr_layers()[1]
    assert layer.hpr_probe["default"].weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)  # meta (unloaded) editors are skipped
