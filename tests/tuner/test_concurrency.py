"""One HPR model used from several threads: every call gets the result it would get alone, and
``edit_settings`` / ``monitor`` act on the thread that entered them only, restoring exactly on exit."""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Callable

import pytest
import torch

from hpr_peft import edit_settings, monitor
from support.hpr import random_hpr_model, token_ids


@pytest.fixture
def busy_switching():
    """Switch threads as often as the interpreter allows, so unsafe shared state shows quickly."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def _left_padded(seed: int):
    ids = token_ids(batch=3, seq=12, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _in_threads(jobs: dict[str, Callable[[], None]]) -> None:
    """Run every job in its own thread (without gradients), started together; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(job: Callable[[], None]) -> None:
        try:
            start.wait()
            with torch.no_grad():  # grad mode is per thread; with gradients the edit takes its training path
                job()
        except BaseException as error:  # collected and re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(job,), name=name) for name, job in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    if errors:
        raise errors[0]


@torch.no_grad()
def test_padded_unpadded_and_generate_in_parallel_give_every_call_its_own_result(busy_switching):
    model = random_hpr_model("llama", target_layers=[0, 1, 2, 3])
    padded, unpadded = _left_padded(seed=1), {"input_ids": token_ids(batch=2, seq=9, seed=2)}
    prompt = token_ids(batch=1, seq=5, seed=3)

    def generate():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
        return torch.stack(out.logits)

    calls = {
        "padded": lambda: model(**padded).logits,
        "unpadded": lambda: model(**unpadded).logits,
        "generate": generate,
    }
    alone = {name: call() for name, call in calls.items()}
    with model.disable_adapter():
        assert not torch.equal(model(**padded).logits, alone["padded"])  # the editors really edit
    rounds = {"padded": 60, "unpadded": 60, "generate": 8}
    wrong = {name: 0 for name in calls}

    def repeat(name: str) -> Callable[[], None]:
        def job() -> None:
            for _ in range(rounds[name]):
                wrong[name] += not torch.equal(calls[name](), alone[name])

        return job

    _in_threads({name: repeat(name) for name in calls})
    assert wrong == {"padded": 0, "unpadded": 0, "generate": 0}


@torch.no_grad()
def test_edit_settings_in_one_thread_leave_another_thread_alone():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids()
    edited = model(ids).logits
    with model.disable_adapter():
        base = model(ids).logits
    inside, other_ran = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def switched_off() -> None:
        with edit_settings(model, alpha=0.0):
            inside.set()
            other_ran.wait(timeout=60)
            seen["inside"] = model(ids).logits
            seen["selected"] = torch.tensor(model.base_model.selected_layers())

    def plain() -> None:
        inside.wait(timeout=60)
        seen["other"] = model(ids).logits
        other_ran.set()

    _in_threads({"edit_settings": switched_off, "plain": plain})
    assert torch.equal(seen["inside"], base)
    assert torch.equal(seen["other"], edited)
    assert torch.equal(model(ids).logits, edited)


@torch.no_grad()
def test_edit_settings_exited_out_of_order_restore_exactly():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids()
    edited = model(ids).logits
    with edit_settings(model, alpha=3.0):
        strength_3 = model(ids).logits
    with edit_settings(model, layers=[2]):
        only_2 = model(ids).logits
    outer, inner = edit_settings(model, alpha=2.0), edit_settings(model, alpha=3.0)
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer block ends first
    assert torch.equal(model(ids).logits, strength_3)  # the inner block is still in force
    inner.__exit__(None, None, None)
    assert torch.equal(model(ids).logits, edited)
    assert model.peft_config["default"].alpha == 1.0

    strength, layers = edit_settings(model, alpha=3.0), edit_settings(model, layers=[2])
    strength.__enter__()
    layers.__enter__()
    strength.__exit__(None, None, None)
    assert torch.equal(model(ids).logits, only_2)
    assert model.base_model.selected_layers() == [2]
    layers.__exit__(None, None, None)
    assert model.base_model.selected_layers() == [1, 2]
    assert torch.equal(model(ids).logits, edited)


@torch.no_grad()
def test_monitor_in_one_thread_neither_stops_nor_records_another_threads_forwards():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids, other_ids = token_ids(batch=2, seq=8, seed=4), token_ids(batch=3, seq=11, seed=5)
    other_alone = model(other_ids).logits
    inside, other_ran = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def watching() -> None:
        with monitor(model) as records:
            inside.set()
            other_ran.wait(timeout=60)
            seen["before own forward"] = records[1].n_tokens
            model(ids)
        seen["records"] = records

    def generating() -> None:
        inside.wait(timeout=60)
        seen["other"] = model(other_ids).logits
        out = model.generate(other_ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        seen["generated"] = out
        other_ran.set()

    _in_threads({"monitor": watching, "generate": generating})
    assert torch.equal(seen["other"], other_alone)  # still edited in the other thread
    assert seen["before own forward"] == 0  # the other thread's tokens were not recorded
    records = seen["records"]
    assert all(record.n_tokens == 2 * (8 - 1) for record in records.values())


@torch.no_grad()
def test_nested_monitors_both_record_and_the_outer_one_keeps_recording():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids(batch=2, seq=8, seed=4)
    with model.disable_adapter():
        base = model(ids).logits
    eligible = 2 * (8 - 1)
    with monitor(model) as outer:
        with monitor(model) as inner:
            assert torch.equal(model(ids).logits, base)
        assert inner[1].n_tokens == eligible and outer[1].n_tokens == eligible
        assert torch.equal(model(ids).logits, base)  # still monitoring, not editing
    assert outer[1].n_tokens == 2 * eligible and inner[1].n_tokens == eligible
    torch.testing.assert_close(outer[2].scores[:eligible], inner[2].scores)
    assert not torch.equal(model(ids).logits, base)


@torch.no_grad()
def test_settings_reach_a_thread_started_in_a_copy_of_the_context():
    model = random_hpr_model("llama", target_layers=[1, 2])
    ids = token_ids()
    with model.disable_adapter():
        base = model(ids).logits
    seen = {}

    def forward(key: str) -> None:
        seen[key] = model(ids).logits

    with edit_settings(model, alpha=0.0):
        carried = threading.Thread(target=contextvars.copy_context().run, args=(forward, "carried"))
        plain = threading.Thread(target=forward, args=("plain",))
        for thread in (carried, plain):
            thread.start()
            thread.join()
    assert torch.equal(seen["carried"], base)
    assert not torch.equal(seen["plain"], base)
