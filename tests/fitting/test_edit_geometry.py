"""Fitting with a mean-difference direction and protected massive dimensions (hpr_peft.fitting.edit_geometry)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.fitting import PairActivations, fit_hpr, train_editors
from hpr_peft.fitting.edit_geometry import LayerGeometry, layer_geometries, target_inputs
from hpr_peft.rotation import angle_between, mean_difference_direction, probe_consistent_angle, pseudo_rotate
from hpr_peft.tuner.layer import predict_angle
from support.activations import interleaved_pairs
from support.models import make_tiny_causal_lm


def massive_pairs(n: int = 200, d: int = 32, layers=(0,), seed: int = 1) -> PairActivations:
    """A huge shared coordinate (dim 1, as on Gemma-3) + unit noise; positives sit higher along dims 0
    and 2 (so the mean difference is not a coordinate axis)."""
    gen = torch.Generator().manual_seed(seed)
    features = {}
    for layer in layers:
        x = torch.randn(2 * n, d, generator=gen)
        x[:, 1] += 100.0
        x[0::2, 0] += 1.0
        x[1::2, 0] -= 1.0
        x[0::2, 2] += 0.5
        features[layer] = x
    return interleaved_pairs(features, [f"g{i}" for i in range(n)])


def test_layer_geometries_measure_the_mean_difference_and_the_massive_dims():
    acts = massive_pairs()
    assert layer_geometries(acts, [0]) == [LayerGeometry()]
    (geometry,) = layer_geometries(acts, [0], "mean_difference", 1)
    pos, neg = acts.pair_tensors(0)
    assert torch.equal(geometry.direction, mean_difference_direction(pos, neg))
    assert geometry.protected.tolist() == [1]
    assert float(geometry.direction[0]) > 0.8  # mostly along the separating dim
    with pytest.raises(ValueError, match="rotation_direction must be one of"):
        layer_geometries(acts, [0], "pca", 0)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        layer_geometries(acts, [0], "probe", 32)


def test_targets_see_the_rotation_direction_and_the_rotated_subspace():
    acts = massive_pairs()
    pos, neg = acts.pair_tensors(0)
    probe = torch.randn(32)
    u = torch.randn(32)
    neg_seen, pos_seen, direction = target_inputs(neg, pos, probe, LayerGeometry(u, torch.tensor([1])))
    assert torch.equal(direction[1:2], torch.zeros(1)) and torch.equal(direction[2:], u[2:])
    assert torch.equal(neg_seen[:, 1], torch.zeros(len(neg))) and torch.equal(pos_seen[:, 0], pos[:, 0])
    assert target_inputs(neg, pos, probe, LayerGeometry())[2] is probe
    # the probe-consistent target with u: rotating x- by it gives x+'s angle to u
    theta = probe_consistent_angle(neg_seen, pos_seen, direction)
    turned = pseudo_rotate(neg, u, theta, torch.tensor([1]))
    reached = angle_between(turned.index_fill(-1, torch.tensor([1]), 0.0), direction.expand_as(neg))
    wanted = angle_between(pos_seen, direction.expand_as(pos))
    moved = theta > 0
    assert moved.any() and torch.allclose(reached[moved], wanted[moved], atol=1e-4)


def _mean_angle(editor, x: torch.Tensor) -> float:
    from hpr_peft.tuner.angle_net import build_angle_net

    net = build_angle_net(x.shape[-1], None)
    net.load_state_dict(editor.angle_state_dict)
    with torch.no_grad():
        return float(predict_angle(net, x).mean())


def test_paper_targets_are_measured_outside_the_massive_dims():
    acts = massive_pairs()
    _, neg = acts.pair_tensors(0)
    angles = {}
    for k in (0, 1):
        weights, _ = train_editors(acts, epochs=4, lr=2e-2, exclude_massive_dims=k, progress=False)
        editor = weights[0]
        assert (editor.protected_dims is None) == (k == 0) and editor.direction is None
        angles[k] = _mean_angle(editor, neg)
    # with the shared coordinate the full angle between x- and x+ is tiny (~0.02 rad); outside it the
    # pairs differ by ~1.6 rad of noise and signal, which is what the restricted rotation must turn
    assert angles[0] < 0.1 and angles[1] > 5 * angles[0]


def test_fit_hpr_installs_the_direction_and_the_massive_dims_and_reports_them():
    acts = massive_pairs(layers=(1, 2))
    config = HPRConfig(target_layers=[1, 2], rotation_direction="mean_difference", exclude_massive_dims=2)
    model = get_peft_model(make_tiny_causal_lm("llama"), config)
    report = fit_hpr(
        model, activations=acts, validation_fraction=0.0, epochs=2, angle_target="probe", progress=False
    )
    assert report.settings["rotation_direction"] == "mean_difference"
    assert report.settings["exclude_massive_dims"] == 2
    for index, layer in model.base_model.hpr_layers().items():
        pos, neg = acts.pair_tensors(index)
        assert torch.equal(
            layer.hpr_direction["default"].weight.detach(), mean_difference_direction(pos, neg)
        )
        protected = layer.hpr_protected["default"].index.tolist()
        assert 1 in protected and len(protected) == 2
