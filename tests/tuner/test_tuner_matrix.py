"""Every behaviour of the tuner on every architecture and every kind of config, as one table.

Like PEFT's own ``tests/test_custom_models.py``: ``TEST_CASES`` lists (name, architecture, config) and
every test method of :class:`TestHPRTuner` runs on each case. Configs with random editors
(``init_weights=False``) really edit; the identity config must not, yet every config trains (one
backward pass reaches every adapter weight).
"""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from hpr_peft import HPRConfig, HPRLayer
from hpr_peft.runtime.blocks import find_decoder_stack
from support.hpr import edited_fraction, token_ids
from support.models import TINY_ARCHS, make_tiny_causal_lm

CONFIGS = {
    "identity": {"target_layers": "all"},
    "random": {"target_layers": [1, 3], "init_weights": False},
    "random-all-layers": {"target_layers": "all", "init_weights": False, "threshold": 0.7},
    "random-no-sequence-start-skip": {
        "target_layers": [0, 2],
        "init_weights": False,
        "skip_sequence_start": False,
    },
    "random-deep-angle-net": {"target_layers": [1, 2], "init_weights": False, "angle_hidden_sizes": [8, 8]},
    "random-linear-angle-net": {
        "target_layers": [2],
        "init_weights": False,
        "angle_hidden_sizes": [],
        "alpha": 0.5,
    },
    "random-last-position": {"target_layers": [1, 3], "init_weights": False, "edit_positions": "last"},
    "random-rotation-options": {
        "target_layers": [1, 2],
        "init_weights": False,
        "rotation_direction": "mean_difference",
        "exclude_massive_dims": 2,
    },
}
TEST_CASES = [(f"{arch}-{name}", arch, config) for arch in TINY_ARCHS for name, config in CONFIGS.items()]


def _targets(config: dict) -> list[int]:
    layers = config["target_layers"]
    return [0, 1, 2, 3] if layers == "all" else list(layers)


def _build(arch: str, config: dict):
    """``(base model, a fresh copy of it, the PEFT model around the first)``."""
    base = make_tiny_causal_lm(arch)
    twin = make_tiny_causal_lm(arch)
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(**config)).eval()
    return base, twin, model


def _left_pad(rows, pad_id=0):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _greedy_uncached(model, ids, steps):
    sequence, step_logits = ids, []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(sequence, use_cache=False).logits[:, -1]
            step_logits.append(logits)
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=-1)
    return sequence, step_logits


@pytest.mark.parametrize("name, arch, config", TEST_CASES, ids=[case[0] for case in TEST_CASES])
class TestHPRTuner:
    def test_targeted_blocks_are_wrapped(self, name, arch, config):
        _, _, model = _build(arch, config)
        stack = find_decoder_stack(model.base_model.model)
        targets = _targets(config)
        assert [isinstance(block, HPRLayer) for block in stack.layers] == [i in targets for i in range(4)]
        assert sorted(model.base_model.hpr_layers()) == targets
        assert all(model.base_model.hpr_layers()[i] is stack.layers[i] for i in targets)

    def test_edits_exactly_when_editors_are_random(self, name, arch, config):
        _, twin, model = _build(arch, config)
        ids = token_ids(seed=1)
        with torch.no_grad():
            reference = twin(ids, output_hidden_states=True)
            out = model(ids, output_hidden_states=True)
        if config.get("init_weights", True):
            assert torch.equal(out.logits, reference.logits)
            for edited, plain in zip(out.hidden_states, reference.hidden_states, strict=True):
                assert torch.equal(edited, plain)
            assert all(layer.is_identity("default") for layer in model.base_model.hpr_layers().values())
            return
        assert not torch.allclose(out.logits, reference.logits, atol=1e-3)
        first = _targets(config)[0]
        fraction = edited_fraction(model, ids, layer=first)
        if config.get("edit_positions") == "last":
            assert 0 < fraction <= 1 / 12 + 1e-6  # the last position of the call, in at least one row
        elif config.get("skip_sequence_start", True):
            assert 0.2 <= fraction <= 11 / 12 + 1e-6  # the sequence start (1 of 12 per row) is never edited
        else:
            assert 0.2 <= fraction <= 1.0

    def test_probes_start_flagging_a_real_share_of_tokens(self, name, arch, config):
        _, twin, model = _build(arch, config)
        ids = token_ids(batch=8, seq=33, seed=12)
        with torch.no_grad():
            states = twin(ids, output_hidden_states=True).hidden_states
        for index, layer in model.base_model.hpr_layers().items():
            probe = layer.hpr_probe["default"].weight[0]
            scores = states[index + 1][:, 1:] @ probe
            flagged = (torch.sigmoid(scores) < config.get("threshold", 0.5)).float().mean()
            if config.get("init_weights", True):
                assert 0.2 <= flagged <= 0.85, (index, flagged)  # undecided: about half
            elif "threshold" not in config:
                assert 0.5 <= flagged <= 0.95, (index, flagged)  # random editors: most, not all
            else:
                assert flagged >= 0.5, (index, flagged)  # a higher threshold flags more

    def test_one_backward_pass_reaches_every_adapter_weight(self, name, arch, config):
        _, _, model = _build(arch, config)
        model.train()
        ids, targets = token_ids(batch=2, seq=16, seed=13), token_ids(batch=2, seq=16, seed=15)
        logits = model(ids).logits  # a next-token loss at every position (also the last one)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("hpr_" in n for n in trainable)
        for n, p in trainable.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        gains = [p.grad for n, p in trainable.items() if "hpr_gain" in n]
        assert len(gains) == len(_targets(config)) and any(g != 0 for g in gains)

    def test_recording_gradients_does_not_change_the_output(self, name, arch, config):
        _, _, model = _build(arch, config)
        ids = token_ids(seed=14)
        with torch.no_grad():
            inference = model(ids).logits
        recorded = model(ids).logits  # the straight-through path: same values, with a graph
        assert recorded.requires_grad
        torch.testing.assert_close(recorded.detach(), inference, rtol=1e-6, atol=1e-6)
        if config.get("init_weights", True):
            assert torch.equal(recorded.detach(), inference)

    def test_disable_adapter_gives_the_base_model_bit_for_bit(self, name, arch, config):
        _, twin, model = _build(arch, config)
        ids = token_ids(seed=2)
        with torch.no_grad():
            reference = twin(ids).logits
            before = model(ids).logits
            with model.disable_adapter():
                assert torch.equal(model(ids).logits, reference)
            assert torch.equal(model(ids).logits, before)  # the adapter is back after the block

    def test_norms_are_kept(self, name, arch, config):
        _, _, model = _build(arch, config)
        ids = token_ids(seed=3)
        layer = _targets(config)[0]
        with torch.no_grad():
            edited = model(ids, output_hidden_states=True).hidden_states[layer + 1]
            with model.disable_adapter():
                plain = model(ids, output_hidden_states=True).hidden_states[layer + 1]
        torch.testing.assert_close(
            edited.double().norm(dim=-1), plain.double().norm(dim=-1), rtol=1e-5, atol=0
        )

    def test_left_padded_batch_equals_each_row_alone_and_padding_is_untouched(self, name, arch, config):
        _, _, model = _build(arch, config)
        generator = torch.Generator().manual_seed(3)
        rows = [torch.randint(3, 128, (n,), generator=generator) for n in (9, 5, 2, 7)]
        ids, mask, position_ids = _left_pad(rows)
        layer = _targets(config)[0]
        with torch.no_grad():
            batched = model(ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
            with model.disable_adapter():
                plain = model(ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
        real = mask.bool()
        changed = (batched.hidden_states[layer + 1] != plain.hidden_states[layer + 1]).any(-1)
        assert not changed[~real].any()  # padding is never edited
        if not config.get("init_weights", True) and config.get("edit_positions", "all") == "all":
            assert changed[real].float().mean() > 0.2  # really edits
        first_real = real.long().argmax(-1)
        if config.get("skip_sequence_start", True):
            assert not changed[torch.arange(len(rows)), first_real].any()
        for i, row in enumerate(rows):
            with torch.no_grad():
                alone = model(row[None]).logits[0]
            torch.testing.assert_close(batched.logits[i, -len(row) :], alone, atol=1e-5, rtol=1e-5)

    def test_cached_generation_equals_uncached_greedy_decoding(self, name, arch, config):
        if config.get("edit_positions") == "last":
            pytest.skip(
                'edit_positions="last" edits the last position of each call: not cache-equivalent by design'
            )
        _, _, model = _build(arch, config)
        ids = token_ids(batch=2, seq=6, seed=11)
        steps = 4
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        sequence, step_logits = _greedy_uncached(model, ids, steps)
        assert torch.equal(out.sequences, sequence)
        for cached, uncached in zip(out.logits, step_logits, strict=True):
            torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)

    def test_save_and_reload_gives_identical_logits(self, name, arch, config, tmp_path):
        _, _, model = _build(arch, config)
        ids = token_ids(seed=4)
        with torch.no_grad():
            expected = model(ids).logits
        model.save_pretrained(tmp_path)
        tensors = load_file(tmp_path / "adapter_model.safetensors")
        parts = ("probe", "angle", "gain", "direction", "protected")
        assert tensors and all(any(f".hpr_{part}." in key for part in parts) for key in tensors)
        assert {int(key.split(".hpr_")[0].rsplit(".", 1)[1]) for key in tensors} == set(_targets(config))
        loaded = PeftModel.from_pretrained(make_tiny_causal_lm(arch), tmp_path).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)

    def test_unload_returns_the_untouched_base_model(self, name, arch, config):
        base, twin, model = _build(arch, config)
        ids = token_ids(seed=5)
        original_blocks = [getattr(block, "base_layer", block) for block in find_decoder_stack(base).layers]
        unloaded = model.unload()
        assert unloaded is base and type(unloaded) is type(twin)
        assert list(find_decoder_stack(unloaded).layers) == original_blocks
        assert not any(isinstance(m, HPRLayer) for m in unloaded.modules())
        assert not any("hpr" in name for name, _ in unloaded.named_parameters())
        assert not unloaded._forward_pre_hooks and not unloaded._forward_hooks
        assert all(not block._forward_hooks for block in find_decoder_stack(unloaded).layers)
        with torch.no_grad():
            assert torch.equal(unloaded(ids).logits, twin(ids).logits)

    def test_a_deep_copy_edits_with_its_own_weights(self, name, arch, config):
        _, _, model = _build(arch, config)
        ids = token_ids(seed=6)
        clone = copy.deepcopy(model)
        with torch.no_grad():
            assert torch.equal(clone(ids).logits, model(ids).logits)
            for layer in clone.base_model.hpr_layers().values():
                layer.hpr_probe["default"].weight.zero_()  # the copy stops editing ...
            untouched = model(ids).logits
            with model.disable_adapter():
                assert torch.equal(clone(ids).logits, model(ids).logits)
        if not config.get("init_weights", True):
            with model.disable_adapter(), torch.no_grad():
                assert not torch.equal(untouched, model(ids).logits)  # ... the original still does

    def test_padded_and_unpadded_forwards_in_two_threads_equal_each_alone(self, name, arch, config):
        _, _, model = _build(arch, config)
        rows = [token_ids(batch=1, seq=n, seed=n)[0] for n in (9, 4, 6)]
        ids, mask, position_ids = _left_pad(rows)
        padded = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}
        plain = {"input_ids": token_ids(batch=2, seq=7, seed=12)}
        with torch.no_grad():
            alone = {"padded": model(**padded).logits, "plain": model(**plain).logits}
        wrong = {"padded": 0, "plain": 0}
        start = threading.Barrier(2)

        def repeat(key: str, batch: dict) -> None:
            start.wait()
            with torch.no_grad():
                for _ in range(12):
                    wrong[key] += not torch.equal(model(**batch).logits, alone[key])

        previous = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as possible
        try:
            threads = [
                threading.Thread(target=repeat, args=item) for item in (("padded", padded), ("plain", plain))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(previous)
        assert wrong == {"padded": 0, "plain": 0}
