"""Fitting: synthetic separable data, scale folding, planted concept, determinism, selection, errors."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.data import ContrastivePair
from hpr_peft.fitting import PairActivations, fit_hpr, select_layers, train_editors
from hpr_peft.fitting.report import FitReport, LayerFitResult
from hpr_peft.rotation import angle_between, probe_consistent_angle, pseudo_rotate
from hpr_peft.tuner.layer import build_angle_net, predict_angle
from support.activations import interleaved_pairs
from support.models import make_char_tokenizer, make_tiny_causal_lm


def synthetic(
    n: int = 400, d: int = 16, layers=(0, 1), separable=(True, False), seed: int = 0
) -> PairActivations:
    """Pairs whose positives/negatives differ along one direction (separable layers) or not at all
    (noise layers). Features carry big non-zero means and very different scales, as real residuals do."""
    gen = torch.Generator().manual_seed(seed)
    feats = {}
    for layer, sep in zip(layers, separable, strict=True):
        scale = torch.logspace(-1, 2, d)
        offset = 5 * torch.randn(d, generator=gen) * scale
        x = torch.randn(2 * n, d, generator=gen) * scale + offset
        if sep:
            x[0::2, 0] = x[0::2, 0].abs() + 0.5 * scale[0]  # positives: + side along feature 0 (small scale)
            x[1::2, 0] = -x[1::2, 0].abs() - 0.5 * scale[0]
            x[:, 0] -= 0  # hyperplane through the origin separates them
        feats[layer] = x
    return interleaved_pairs(feats, [f"g{i // 2}" for i in range(n)])


def test_separable_probe_reaches_one_and_angle_loss_falls():
    acts = synthetic()
    train, val = acts.select_pairs(range(320)), acts.select_pairs(range(320, 400))
    weights, results = train_editors(train, val, epochs=6, batch_size=16, lr=5e-3, progress=False)
    sep, noise = results
    assert sep.val_accuracy == 1.0 and sep.train_accuracy == 1.0
    assert noise.val_accuracy < 0.75
    history = [h["train_angle_mse"] for h in sep.history]
    assert history[-1] < 0.5 * history[0]
    # folding: the installed weights act on raw h and reproduce the reported validation metrics
    pos, neg = val.pair_tensors(0)
    w = weights[0].probe_weight
    acc = ((pos @ w > 0).float().mean() + (neg @ w <= 0).float().mean()) / 2
    assert float(acc) == pytest.approx(sep.val_accuracy)
    net = build_angle_net(16, None)
    net.load_state_dict(weights[0].angle_state_dict)
    from hpr_peft.rotation import angle_between as _angle_between

    with torch.no_grad():
        mse = torch.cat(
            [predict_angle(net, pos) ** 2, (predict_angle(net, neg) - _angle_between(neg, pos)) ** 2]
        ).mean()
    assert float(mse) == pytest.approx(sep.val_angle_mse, rel=1e-4, abs=1e-6)


def test_angle_bias_starts_at_mean_target_and_no_collapse():
    # one epoch at tiny lr: the angle net's prediction starts near the mean target, not near 0
    acts = synthetic(n=200)
    weights, results = train_editors(acts, None, layers=[0], epochs=1, lr=1e-6, progress=False)
    pos, neg = acts.pair_tensors(0)
    from hpr_peft.rotation import angle_between as _angle_between

    mean_target = float(_angle_between(neg, pos).mean() / 2)
    net = build_angle_net(16, None)
    net.load_state_dict(weights[0].angle_state_dict)
    with torch.no_grad():
        mean_pred = float(torch.cat([predict_angle(net, pos), predict_angle(net, neg)]).mean())
    assert abs(mean_pred - mean_target) < 0.25 * mean_target
    assert results[0].val_accuracy is None and results[0].best_epoch == 1


def test_layer_fit_does_not_depend_on_other_layers():
    acts = synthetic()
    both, _ = train_editors(acts, None, epochs=2, progress=False)
    alone, _ = train_editors(acts, None, layers=[0], epochs=2, progress=False)
    torch.testing.assert_close(alone[0].probe_weight, both[0].probe_weight, atol=1e-5, rtol=1e-4)


def _angles(editor, x: torch.Tensor) -> torch.Tensor:
    net = build_angle_net(x.shape[-1], None)
    net.load_state_dict(editor.angle_state_dict)
    with torch.no_grad():
        return predict_angle(net, x)


def test_probe_target_keeps_the_probe_and_learns_theta_star():
    acts = synthetic()
    train, val = acts.select_pairs(range(320)), acts.select_pairs(range(320, 400))
    kw = dict(epochs=6, batch_size=16, lr=5e-3, progress=False)
    _, paper = train_editors(train, val, angle_target="paper", **kw)
    weights, probe = train_editors(train, val, angle_target="probe", **kw)
    for a, b in zip(paper, probe, strict=True):
        # stage 1 is the same BCE, optimiser and minibatches: the same probe accuracy, epoch by epoch
        assert (b.val_accuracy, b.train_accuracy) == (a.val_accuracy, a.train_accuracy)
        assert [h["val_accuracy"] for h in b.history] == [h["val_accuracy"] for h in a.history]
        assert a.angle_best_epoch is None and 1 <= b.angle_best_epoch <= 6
    assert probe[0].val_accuracy == 1.0
    # the angle net fits θ* of the installed (raw) probe on negatives, far below the paper's target
    pos, neg = train.pair_tensors(0)
    target = probe_consistent_angle(neg, pos, weights[0].probe_weight)
    error = (_angles(weights[0], neg) - target).abs().mean()
    assert float(error) < 0.3 * float(target.mean())
    assert float(target.mean()) < 0.1 * float(angle_between(neg, pos).mean())
    # folding: the installed weights reproduce the reported validation angle MSE against θ*
    vpos, vneg = val.pair_tensors(0)
    vtarget = probe_consistent_angle(vneg, vpos, weights[0].probe_weight)
    mse = torch.cat([_angles(weights[0], vpos) ** 2, (_angles(weights[0], vneg) - vtarget) ** 2]).mean()
    assert float(mse) == pytest.approx(probe[0].val_angle_mse, rel=1e-3, abs=1e-9)
    # without validation data: best probe epoch by training accuracy, angle net by training MSE
    _, alone = train_editors(acts, None, layers=[0], epochs=2, angle_target="probe", progress=False)
    assert alone[0].val_accuracy is None and alone[0].val_angle_mse is None
    assert alone[0].best_epoch >= 1 and alone[0].angle_best_epoch >= 1


def shared_offset(n: int = 400, d: int = 32, big: float = 100.0) -> PairActivations:
    """Every activation = a big constant vector (one massive dimension, as on Gemma-3) + unit noise,
    with positives and negatives separated along feature 0 only."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * n, d, generator=gen)
    x[:, 1] += big
    x[0::2, 0] = 0.5 + 0.5 * torch.rand(n, generator=gen)
    x[1::2, 0] = -0.5 - 0.5 * torch.rand(n, generator=gen)
    return PairActivations(
        layers=[0],
        hidden_size=d,
        token_selection="last",
        storage_dtype=torch.float32,
        pair_group_ids=[f"g{i}" for i in range(n)],
        seq_offsets=torch.arange(2 * n + 1),
        pos_rows=torch.arange(0, 2 * n, 2),
        neg_rows=torch.arange(1, 2 * n, 2),
        row_pair=torch.arange(n),
        features={0: x},
    )


def test_probe_target_moves_negatives_only_by_the_probe_gap_under_a_shared_offset():
    acts = shared_offset()
    train, val = acts.select_pairs(range(320)), acts.select_pairs(range(320, 400))
    pos, neg = val.pair_tensors(0)
    moved = {}
    for target in ("paper", "probe"):
        weights, results = train_editors(train, val, epochs=6, lr=2e-2, angle_target=target, progress=False)
        assert results[0].val_accuracy > 0.95
        w = weights[0].probe_weight
        w_hat = w / w.norm()
        theta = _angles(weights[0], neg)  # alpha = 1
        edited = pseudo_rotate(neg, w, theta)
        gap = float(((pos - neg) @ w_hat).median())  # the pair's probe-coordinate gap
        moved[target] = (float(theta.mean()), float(((edited - neg) @ w_hat).median()) / gap)
    # the paper's target counts the noise directions the edit cannot move along: ~5x the gap
    assert moved["probe"][0] < 0.3 * moved["paper"][0]
    assert 0.5 < moved["probe"][1] < 1.5
    assert moved["paper"][1] > 3.0


def test_select_layers():
    rs = [
        LayerFitResult(layer=i, train_accuracy=0.9, train_angle_mse=0.1, val_accuracy=a)
        for i, a in enumerate([0.6, 0.8, 0.7, 0.8])
    ]
    assert select_layers(rs, top_k=2)[0] == [1, 3]
    assert select_layers(rs, top_k=None, min_accuracy=0.7)[0] == [1, 2, 3]
    assert select_layers(rs, top_k=1, scores={0: 5.0, 1: 1.0, 2: 0.0, 3: 2.0})[0] == [0]
    with pytest.raises(ValueError, match="top_k"):
        select_layers(rs, top_k=0)


MARK_POS, MARK_NEG = "#", "%"


def planted_model():
    """Tiny Llama where '#' and '%' have identical embeddings (blocks 0-1 cannot tell them apart) and
    block 2's MLP writes +v at '#' and -v at '%': the concept exists from block 2 on."""
    model = make_tiny_causal_lm("llama")
    tok = make_char_tokenizer()
    a, b = tok.convert_tokens_to_ids([MARK_POS, MARK_NEG])
    with torch.no_grad():
        model.model.embed_tokens.weight[b] = model.model.embed_tokens.weight[a]
    v = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0) * 8
    state = {}

    def remember(module, args, kwargs):
        state["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def plant(module, args, output):
        ids = state["ids"]
        sign = (ids == a).float() - (ids == b).float()
        return output + sign.unsqueeze(-1) * v

    model.register_forward_pre_hook(remember, with_kwargs=True)
    model.model.layers[2].mlp.register_forward_hook(plant)
    return model, tok


def planted_pairs(n: int = 48) -> list[ContrastivePair]:
    return [ContrastivePair(f"Q: item {i}?\nA:", f" {MARK_POS}", f" {MARK_NEG}", f"g{i}") for i in range(n)]


def test_planted_concept_selects_right_layers_and_edit_flips_negatives(tmp_path):
    model, tok = planted_model()
    peft_model = get_peft_model(model, HPRConfig(target_layers="all"))
    report = fit_hpr(peft_model, tok, planted_pairs(), top_k=2, epochs=4, lr=5e-3, progress=False)
    assert report.selected_layers == [2, 3]
    assert report.layer(0).val_accuracy == 0.5 and report.layer(1).val_accuracy == 0.5
    assert report.layer(2).val_accuracy == 1.0
    config = peft_model.peft_config["default"]
    assert config.selected_layers == [2, 3]
    assert FitReport.from_dict(config.fit_results).selected_layers == [2, 3]

    layer2 = peft_model.base_model.hpr_layers()[2]
    w = layer2.hpr_probe["default"].weight[0].detach()
    flipped, untouched = [], []
    for pair in planted_pairs(12):
        for text, positive in ((pair.prompt + pair.positive, True), (pair.prompt + pair.negative, False)):
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                edited = peft_model(ids, output_hidden_states=True).hidden_states[3][0, -1]
                with peft_model.disable_adapter():
                    base = peft_model(ids, output_hidden_states=True).hidden_states[3][0, -1]
            if positive:
                untouched.append(torch.equal(edited, base))
            else:
                assert float(base @ w) < 0
                flipped.append(float(edited @ w) > 0)
                torch.testing.assert_close(edited.norm(), base.norm(), rtol=1e-4, atol=1e-4)
    assert all(untouched)
    assert sum(flipped) >= 0.9 * len(flipped)

    # selected layers and the report travel in adapter_config.json
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh, _ = planted_model()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert loaded.peft_config["default"].selected_layers == [2, 3]
    assert loaded.peft_config["default"].fit_results["selected_layers"] == [2, 3]


@pytest.mark.parametrize("angle_target", ["paper", "probe"])
def test_fit_is_bit_identical_across_runs(tmp_path, angle_target):
    tok = make_char_tokenizer()
    pairs = [
        ContrastivePair(f"Q: n{i}?\nA:", f" yes {i % 3}", f" no {i % 4}", f"g{i // 2}") for i in range(40)
    ]
    blobs = []
    for run in range(2):
        peft_model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2, 3]))
        fit_hpr(peft_model, tok, pairs, top_k=2, epochs=2, seed=7, progress=False, angle_target=angle_target)
        assert peft_model.peft_config["default"].fit_results["settings"]["angle_target"] == angle_target
        peft_model.save_pretrained(tmp_path / f"run{run}")
        blobs.append((tmp_path / f"run{run}" / "adapter_model.safetensors").read_bytes())
    assert blobs[0] == blobs[1]


def test_layer_scorer_and_threshold():
    tok = make_char_tokenizer()
    model, tok = planted_model()
    peft_model = get_peft_model(model, HPRConfig(target_layers=[0, 2, 3]))
    seen = []

    def scorer(m, layer):
        seen.append(layer)
        return -layer  # prefer low layers

    report = fit_hpr(
        peft_model, tok, planted_pairs(24), top_k=1, layer_scorer=scorer, epochs=1, progress=False
    )
    assert seen == [0, 2, 3] and report.selected_layers == [0]
    assert report.layer(0).score == 0
    report = fit_hpr(
        peft_model, tok, planted_pairs(24), top_k=None, min_accuracy=0.9, epochs=3, lr=5e-3, progress=False
    )
    assert report.selected_layers == [2, 3]
    assert peft_model.base_model.selected_layers() == [2, 3]


def test_fit_bad_inputs():
    tok = make_char_tokenizer()
    model = make_tiny_causal_lm("llama")
    with pytest.raises(TypeError, match="get_peft_model"):
        fit_hpr(model, tok, planted_pairs(4))
    peft_model = get_peft_model(model, HPRConfig(target_layers=[1, 2]))
    with pytest.raises(ValueError, match="pairs is empty"):
        fit_hpr(peft_model, tok, [], progress=False)
    with pytest.raises(ValueError, match=r"layers \[3\] are not target layers"):
        fit_hpr(peft_model, tok, planted_pairs(4), layers=[3], progress=False)
    one_group = [ContrastivePair("Q: a?\nA:", " x", " y", "g"), ContrastivePair("Q: a?\nA:", " x", " z", "g")]
    with pytest.raises(ValueError, match="at least 2 groups"):
        fit_hpr(peft_model, tok, one_group, progress=False)
    with pytest.raises(ValueError, match="validation_fraction"):
        fit_hpr(peft_model, tok, planted_pairs(4), validation_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit_hpr(peft_model, tok, planted_pairs(4), epochs=0, progress=False)
    with pytest.raises(ValueError, match=r"angle_target must be one of \['paper', 'probe'\]"):
        fit_hpr(peft_model, tok, planted_pairs(4), angle_target="reflection", progress=False)
    with pytest.raises(ValueError, match="angle_target"):
        train_editors(synthetic(n=8), angle_target="Probe", progress=False)


def test_report_roundtrip_table_and_plot(tmp_path):
    rs = [
        LayerFitResult(
            layer=i,
            train_accuracy=0.9,
            train_angle_mse=0.1,
            val_accuracy=0.5 + i / 10,
            val_angle_mse=math.nan,
            best_epoch=2,
        )
        for i in range(3)
    ]
    report = FitReport(layers=rs, selected_layers=[2], selection="top 1", timings={"training": 1.5})
    text = report.to_json(tmp_path / "r.json")
    again = FitReport.from_json(tmp_path / "r.json")
    assert FitReport.from_json(text).selected_layers == [2] and again.layer(1).val_accuracy == 0.6
    assert again.layer(0).val_angle_mse is None  # NaN -> null: strict JSON
    table = str(report)
    assert "layer" in table and "selected layers: [2]" in table and table.count("\n") >= 5
    png = report.plot_probe_accuracy(tmp_path / "acc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smollm2_truthfulqa_end_to_end(smollm2, truthfulqa_dir, tmp_path):
    from hpr_peft.data import load_truthfulqa, load_truthfulqa_mc
    from hpr_peft.fitting.collection import tokenize_pairs_texts

    model, tok = smollm2
    questions = [q.question_id for q in load_truthfulqa_mc(truthfulqa_dir)[:20]]
    pairs = load_truthfulqa(truthfulqa_dir, question_ids=questions, max_pairs_per_question=3)
    # completion positions are exact with the real tokenizer (leading space included)
    ids, starts = tokenize_pairs_texts(tok, [p.prompt for p in pairs[:5]], [p.negative for p in pairs[:5]])
    for row, start, pair in zip(ids, starts, pairs[:5], strict=True):
        assert tok.decode(row[start:]) == pair.negative
        assert tok.decode(row[:start]).endswith("A:")
    peft_model = get_peft_model(model, HPRConfig(target_layers=[8, 14, 20]))
    try:
        report = fit_hpr(peft_model, tok, pairs, top_k=2, epochs=1, collection_batch_size=16, progress=False)
        assert len(report.selected_layers) == 2
        assert report.n_train_pairs + report.n_val_pairs == len(pairs) == 60
        assert all(0.0 <= r.val_accuracy <= 1.0 for r in report.layers)
        peft_model.save_pretrained(tmp_path / "a")
        assert (tmp_path / "a" / "adapter_model.safetensors").stat().st_size > 0
    finally:
        peft_model.unload()  # leave the session-scoped model clean for other tests
