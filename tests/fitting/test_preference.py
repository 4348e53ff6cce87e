"""The preference objective: it learns, it touches only the chosen editors, it is reproducible and
saved like any fit, its KL term bites, and bad input gets a clear error; the same for the additive
baseline's steering vectors (fit_preference_vectors)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel, get_peft_model

import hpr_peft.tuner.layer as layer_module
from hpr_peft import HPRConfig
from hpr_peft.data import ContrastivePair
from hpr_peft.evaluation.baselines import additive_steering
from hpr_peft.fitting import (
    PreferenceSettings,
    fit_hpr,
    fit_preference,
    fit_preference_vectors,
    preference_margins,
)
from support.models import make_char_tokenizer, make_tiny_causal_lm

TOKENIZER = make_char_tokenizer()


def pairs(n: int = 16, offset: int = 0) -> list[ContrastivePair]:
    return [
        ContrastivePair(f"Shared context. Q: n{i}?\nA:", f" yes {i % 3}", f" no {i % 4}", f"g{i}")
        for i in range(offset, offset + n)
    ]


def fitted_model():
    """Tiny Llama with editors fitted by the paper's objective on layers 1-3; layers 1 and 2 edit."""
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2, 3]))
    fit_hpr(model, TOKENIZER, pairs(24), epochs=2, top_k=2, layer_scorer=lambda m, x: -x, progress=False)
    assert model.base_model.selected_layers() == [1, 2]
    return model


def settings(**changes) -> PreferenceSettings:
    return dataclasses.replace(PreferenceSettings(epochs=3, lr=2e-2, batch_size=4), **changes)


def editor_state(model, layer: int) -> dict[str, torch.Tensor]:
    hpr = model.base_model.hpr_layers()[layer]
    modules = {
        "probe": hpr.hpr_probe["default"],
        "angle": hpr.hpr_angle["default"],
        "gain": hpr.hpr_gain["default"],
    }
    return {f"{k}.{n}": t.detach().clone() for k, m in modules.items() for n, t in m.state_dict().items()}


def prompt_kl(model, prompts: list[ContrastivePair]) -> float:
    """Mean KL(edited || unedited) of next-token distributions over the prompts' tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for pair in prompts:
            ids = TOKENIZER(pair.prompt, return_tensors="pt")["input_ids"]
            edited = torch.log_softmax(model(ids).logits[0].float(), -1)
            with model.disable_adapter():
                plain = torch.log_softmax(model(ids).logits[0].float(), -1)
            total += float((edited.exp() * (edited - plain)).sum(-1).sum())
            count += ids.shape[1]
    return total / count


def test_loss_falls_and_training_margin_rises():
    model = fitted_model()
    before = preference_margins(model, TOKENIZER, pairs())
    report = fit_preference(model, TOKENIZER, pairs(), settings=settings(epochs=4), progress=False)
    after = preference_margins(model, TOKENIZER, pairs())
    assert report.epochs[-1].loss < report.epochs[0].loss
    assert float(after.mean()) > float(before.mean()) + 0.1
    assert report.layers == [1, 2] and report.n_pairs == 16 and report.shared_prefix_tokens > 10
    assert report.to_dict()["epochs"][0]["epoch"] == 1


def test_shared_prefix_gives_the_margins_of_full_forwards():
    model = fitted_model()
    shared = preference_margins(model, TOKENIZER, pairs(), share_prefix=True)
    full = preference_margins(model, TOKENIZER, pairs(), share_prefix=False)
    torch.testing.assert_close(shared, full, rtol=1e-4, atol=1e-4)
    # and the margins are those of plain per-pair forwards
    pair = pairs(1)[0]
    logps = []
    for answer in (pair.positive, pair.negative):
        ids = TOKENIZER(pair.prompt + answer, return_tensors="pt")["input_ids"]
        n_prompt = len(TOKENIZER(pair.prompt)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        logps.append(float(logp[n_prompt - 1 :].gather(-1, ids[0, n_prompt:, None]).sum()))
    assert float(full[0]) == pytest.approx(logps[0] - logps[1], abs=1e-4)


def editor_gradients(model) -> tuple[dict[str, float], torch.Tensor]:
    """Gradient norms of layer 1's probe, angle net and gain for the LM loss of one pair text."""
    ids = TOKENIZER(pairs(1)[0].prompt + " yes 0", return_tensors="pt")["input_ids"]
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    hpr = model.base_model.hpr_layers()[1]
    grads = {
        "probe": hpr.hpr_probe["default"].weight.grad,
        "angle": torch.cat([p.grad.flatten() for p in hpr.hpr_angle["default"].parameters()]),
        "gain": hpr.hpr_gain["default"].weight.grad,
    }
    return {name: float(grad.norm()) for name, grad in grads.items()}, hpr.hpr_probe[
        "default"
    ].weight.grad.clone()


def test_gradients_reach_probe_angle_net_and_gain_and_the_probe_learns_through_the_gate(monkeypatch):
    model = fitted_model()
    norms, probe_grad = editor_gradients(model)
    assert all(norm > 0 for norm in norms.values()), norms
    # without the straight-through term the probe learns only through the rotation's direction
    monkeypatch.setattr(layer_module, "flag_probability", lambda s, t: torch.sigmoid(-s.float()).detach())
    _, direction_only = editor_gradients(model)
    assert not torch.allclose(probe_grad, direction_only, rtol=1e-3, atol=1e-8)
    # and the preference fit moves every trained editor weight
    monkeypatch.undo()
    start = editor_state(model, 1)
    fit_preference(model, TOKENIZER, pairs(8), settings=settings(epochs=1), progress=False)
    end = editor_state(model, 1)
    assert all(not torch.equal(start[k], end[k]) for k in start), [
        k for k in start if torch.equal(start[k], end[k])
    ]


def test_freeze_probe_trains_angle_net_and_gain_only():
    model = fitted_model()
    start = editor_state(model, 1)
    report = fit_preference(
        model, TOKENIZER, pairs(8), settings=settings(epochs=1, freeze_probe=True), progress=False
    )
    end = editor_state(model, 1)
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(k.startswith(("angle.", "gain.")) for k in changed), changed
    assert all(torch.equal(start[k], end[k]) for k in start if k.startswith("probe."))
    assert report.settings["freeze_probe"] is True
    probe = model.base_model.hpr_layers()[1].hpr_probe["default"].weight
    assert probe.requires_grad  # the flags of before are restored


def test_editor_lr_sets_the_step_of_probes_and_angle_nets_but_not_of_the_gain():
    """The probe and angle net (inputs: raw hidden states) move with editor_lr, the gain with lr;
    editor_lr equal to lr is the default, bit for bit."""
    runs = {}
    for name, editor_lr in {"default": None, "same": 2e-2, "small": 1e-6}.items():
        model = fitted_model()
        start = editor_state(model, 1)
        report = fit_preference(
            model, TOKENIZER, pairs(8), settings=settings(epochs=1, editor_lr=editor_lr), progress=False
        )
        end = editor_state(model, 1)
        runs[name] = {k: (end[k] - start[k]).abs().max().item() for k in start}, report
    default, same, small = (runs[k][0] for k in ("default", "same", "small"))
    assert default == same and runs["same"][1].settings["editor_lr"] == 2e-2
    for key in default:
        if key.startswith(("probe.", "angle.")):
            assert 0 < small[key] <= 1e-5 < default[key], key  # Adam moves a weight by ~lr per step
    assert small["gain.weight"] > 1e-3  # still at lr


def test_only_the_chosen_editors_change_and_state_is_restored():
    model = fitted_model()
    base = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "hpr_" not in k}
    untouched = {layer: editor_state(model, layer) for layer in (2, 3)}
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())
    fit_preference(model, TOKENIZER, pairs(8), layers=[1], settings=settings(epochs=1), progress=False)
    for key, value in model.get_base_model().state_dict().items():
        if "hpr_" not in key:
            assert torch.equal(value, base[key]), key
    for layer, state in untouched.items():
        assert all(torch.equal(editor_state(model, layer)[k], v) for k, v in state.items()), layer
    assert not all(
        torch.equal(editor_state(model, 1)[k], v) for k, v in editor_state(fitted_model(), 1).items()
    )
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(module.training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_a_large_kl_weight_keeps_the_edited_model_close():
    drifts = {}
    for weight in (0.0, 200.0):
        model = fitted_model()
        fit_preference(
            model, TOKENIZER, pairs(), settings=settings(kl_weight=weight, lr=5e-2), progress=False
        )
        drifts[weight] = prompt_kl(model, pairs())
    assert drifts[200.0] < 0.5 * drifts[0.0], drifts


def test_kl_within_the_budget_is_free_and_above_it_costs():
    states = {}
    for name, changes in {
        "no kl": dict(kl_weight=0.0),
        "budget above any kl": dict(kl_weight=200.0, kl_budget=1e6),
        "no budget": dict(kl_weight=200.0),
    }.items():
        model = fitted_model()
        report = fit_preference(
            model, TOKENIZER, pairs(8), settings=settings(lr=5e-2, **changes), progress=False
        )
        states[name] = (editor_state(model, 1), [e.loss for e in report.epochs])
    free, unpenalised = states["budget above any kl"], states["no kl"]
    assert free[1] == unpenalised[1]
    assert all(torch.equal(free[0][k], unpenalised[0][k]) for k in free[0])
    assert not all(torch.equal(states["no budget"][0][k], free[0][k]) for k in free[0])


def test_kl_on_neutral_paragraphs():
    model = fitted_model()
    neutral = ["The river runs past the old mill.", "Bread is baked early in the morning."]
    report = fit_preference(
        model,
        TOKENIZER,
        pairs(8),
        settings=settings(kl_on="neutral", epochs=1),
        neutral_paragraphs=neutral,
        progress=False,
    )
    assert report.epochs[0].kl is not None and report.epochs[0].kl >= 0
    assert (
        fit_preference(model, TOKENIZER, pairs(4), settings=settings(kl_weight=0.0), progress=False)
        .epochs[0]
        .kl
        is None
    )


def test_deterministic_for_a_seed():
    results = []
    for _ in range(2):
        model = fitted_model()
        report = fit_preference(model, TOKENIZER, pairs(), settings=settings(seed=3), progress=False)
        results.append((editor_state(model, 1), editor_state(model, 2), [e.loss for e in report.epochs]))
    (a1, a2, loss_a), (b1, b2, loss_b) = results
    assert loss_a == loss_b
    assert all(torch.equal(a1[k], b1[k]) and torch.equal(a2[k], b2[k]) for k in a1)


def test_validation_keeps_the_best_epoch():
    model = fitted_model()
    report = fit_preference(
        model, TOKENIZER, pairs(), validation_pairs=pairs(8, offset=100), settings=settings(), progress=False
    )
    assert report.n_val_pairs == 8 and report.val_before is not None and report.best_epoch in (0, 1, 2, 3)
    candidates = [(report.val_before["accuracy"], report.val_before["margin"])]
    candidates += [(e.val_accuracy, e.val_margin) for e in report.epochs]
    best = max(candidates)
    assert (report.val_after["accuracy"], report.val_after["margin"]) == pytest.approx(best, abs=1e-5)
    assert candidates.index(best) == report.best_epoch


def test_saved_adapter_round_trips(tmp_path):
    model = fitted_model()
    fit_preference(model, TOKENIZER, pairs(8), settings=settings(epochs=1), progress=False)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path / "adapter")
    ids = TOKENIZER(pairs(1)[0].prompt + " yes 0", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
        with model.disable_adapter():
            assert not torch.equal(model(ids).logits, loaded(ids).logits)


def test_bad_inputs_give_clear_errors():
    model = fitted_model()
    cases = [
        (dict(pairs=[]), "pairs is empty"),
        (dict(settings=PreferenceSettings(kl_on="everywhere")), "kl_on"),
        (dict(settings=PreferenceSettings(kl_weight=-1.0)), "kl_weight"),
        (dict(settings=PreferenceSettings(kl_budget=float("nan"))), "kl_budget must be a finite number >= 0"),
        (dict(settings=PreferenceSettings(epochs=0)), "epochs"),
        (dict(settings=PreferenceSettings(freeze_probe="yes")), "freeze_probe must be True or False"),
        (
            dict(settings=PreferenceSettings(editor_lr=0.0)),
            "editor_lr must be a positive finite number or None",
        ),
        (
            dict(settings=PreferenceSettings(editor_lr=True)),
            "editor_lr must be a positive finite number or None",
        ),
        (dict(layers=[0]), "not target layers"),
        (dict(layers=[3]), "do not edit"),
        (dict(settings=PreferenceSettings(kl_on="neutral")), "neutral_paragraphs"),
        (dict(neutral_paragraphs=["some text here"]), "kl_on='prompts'"),
        (dict(settings=PreferenceSettings(max_length=8)), "max_length"),
        (dict(validation_pairs=pairs(2)), "also training pairs"),
    ]
    for changes, message in cases:
        arguments = {"pairs": pairs(4), **changes}
        with pytest.raises(ValueError, match=message):
            fit_preference(model, TOKENIZER, arguments.pop("pairs"), progress=False, **arguments)
    with pytest.raises(TypeError, match="get_peft_model"):
        fit_preference(make_tiny_causal_lm("llama"), TOKENIZER, pairs(4), progress=False)


# ----------------------------------------------------------------------------------------------------
# The same objective for the additive baseline


def start_vectors(layers=(1, 2), seed: int = 0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {layer: 0.05 * torch.randn(32, generator=generator) for layer in layers}


def steered_margins(model, vectors, alpha: float, some_pairs) -> torch.Tensor:
    """Margins with ``additive_steering`` on the model without its HPR adapter (a plain model as is)."""
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            base = model.get_base_model()
            with additive_steering(base, vectors, alpha=alpha):
                return preference_margins(base, TOKENIZER, some_pairs)
    with additive_steering(model, vectors, alpha=alpha):
        return preference_margins(model, TOKENIZER, some_pairs)


def test_trained_vectors_raise_the_margin_and_the_loss_falls():
    model = make_tiny_causal_lm("llama")
    start = start_vectors()
    kept = {k: v.clone() for k, v in start.items()}
    trained, report = fit_preference_vectors(
        model, TOKENIZER, pairs(), start, alpha=2.0, settings=settings(epochs=4), progress=False
    )
    assert report.epochs[-1].loss < report.epochs[0].loss
    assert report.epochs[-1].kl > 0  # the reference pass is unsteered
    before = steered_margins(model, start, 2.0, pairs())
    after = steered_margins(model, trained, 2.0, pairs())
    assert float(after.mean()) > float(before.mean()) + 0.1
    assert report.layers == [1, 2] and report.n_pairs == 16
    assert all(torch.equal(start[k], kept[k]) for k in start)  # the inputs are not modified
    assert sorted(trained) == [1, 2]
    assert all(
        v.dtype == torch.float32 and not v.requires_grad and v.shape == (32,) for v in trained.values()
    )


def test_report_margins_are_those_of_additive_steering_with_the_returned_vectors():
    model = make_tiny_causal_lm("llama")
    held_out = pairs(8, offset=100)
    trained, report = fit_preference_vectors(
        model,
        TOKENIZER,
        pairs(),
        start_vectors(),
        alpha=2.0,
        validation_pairs=held_out,
        settings=settings(),
        progress=False,
    )
    for vectors, measured in ((start_vectors(), report.val_before), (trained, report.val_after)):
        margins = steered_margins(model, vectors, 2.0, held_out)
        assert measured["margin"] == pytest.approx(float(margins.mean()), abs=1e-4)
        assert measured["accuracy"] == pytest.approx(float((margins > 0).float().mean()))
    assert report.val_after["margin"] > report.val_before["margin"]


def test_on_an_hpr_model_the_adapter_is_off_and_nothing_of_the_model_changes():
    model = fitted_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    ids = TOKENIZER(pairs(1)[0].prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        edited_before = model(ids).logits
    trained, report = fit_preference_vectors(
        model,
        TOKENIZER,
        pairs(),
        start_vectors(),
        validation_pairs=pairs(8, offset=100),
        settings=settings(epochs=2),
        progress=False,
    )
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(module.training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, edited_before, rtol=0, atol=0)
    # the edited pass had the adapter off: the report's margins are those of steering alone
    margins = steered_margins(model, trained, 1.0, pairs(8, offset=100))
    assert report.val_after["margin"] == pytest.approx(float(margins.mean()), abs=1e-4)
    with_adapter = preference_margins(model, TOKENIZER, pairs(8, offset=100))
    assert float((with_adapter - margins).abs().max()) > 1e-3


def test_trained_vectors_are_deterministic_for_a_seed_and_ignore_editor_lr():
    """A steering vector reads no hidden state: editor_lr (HPR's probes and angle nets) leaves it be."""
    runs = [
        fit_preference_vectors(
            make_tiny_causal_lm("llama"),
            TOKENIZER,
            pairs(),
            start_vectors(),
            settings=settings(seed=5, editor_lr=editor_lr),
            progress=False,
        )
        for editor_lr in (None, 1e-9)
    ]
    (a, report_a), (b, report_b) = runs
    assert [e.loss for e in report_a.epochs] == [e.loss for e in report_b.epochs]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vector_fit_bad_inputs_give_clear_errors():
    model = make_tiny_causal_lm("llama")
    cases = [
        ({}, {}, ValueError, "non-empty dict"),
        ({9: torch.zeros(32)}, {}, ValueError, "decoder blocks are 0..3"),
        ({1: torch.zeros(2, 32)}, {}, ValueError, "1-D tensor"),
        ({1: torch.zeros(16)}, {}, ValueError, "hidden size is 32"),
        ({1: torch.zeros(32)}, {"alpha": 0.0}, ValueError, "alpha"),
        ({1: torch.zeros(32)}, {"settings": PreferenceSettings(lr=0.0)}, ValueError, "lr"),
    ]
    for vectors, extra, error, message in cases:
        with pytest.raises(error, match=message):
            fit_preference_vectors(model, TOKENIZER, pairs(4), vectors, progress=False, **extra)
    with pytest.raises(ValueError, match="pairs is empty"):
        fit_preference_vectors(model, TOKENIZER, [], {1: torch.zeros(32)}, progress=False)
