"""fsmis_bench.recorded: one recording per input signature, static inputs and outputs,
a second recording reading the first one's outputs, padding, and the CPU fallback."""

from __future__ import annotations

import pytest
import torch

from fsmis_bench import recorded


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(recorded, "STAND_IN", recorded.EagerReplay)


def test_a_signature_is_recorded_once_and_replayed_on_new_values(stand_in):
    runs = []

    def double(x):
        runs.append(x.shape)
        return {"twice": 2 * x, "parts": (x + 1,)}

    call = recorded.RecordedCall(double)
    first = call(torch.ones(3))
    assert torch.equal(first["twice"], torch.full((3,), 2.0))
    second = call(torch.arange(3.0))
    assert second is first  # the static output, overwritten in place
    assert torch.equal(second["twice"], torch.tensor([0.0, 2.0, 4.0]))
    assert torch.equal(second["parts"][0], torch.tensor([1.0, 2.0, 3.0]))
    call(torch.ones(2, 2))  # a new shape: a second recording
    assert call.recordings == 2
    # per signature: warm-up calls, the recording, then one run per replay (the stand-in)
    per_signature = recorded.WARMUP_CALLS + 1
    assert len(runs) == 2 * per_signature + 3


def test_a_recording_reads_another_recordings_static_output(stand_in):
    support_side = recorded.RecordedCall(lambda s: {"bank": s * 10})
    support = support_side(torch.tensor([1.0]))
    query_side = recorded.RecordedCall(lambda q: q + support["bank"])
    assert torch.equal(query_side(torch.tensor([0.5])), torch.tensor([10.5]))
    assert support_side(torch.tensor([2.0])) is support  # the same static output, rewritten
    assert torch.equal(query_side(torch.tensor([0.5])), torch.tensor([20.5]))


def test_the_inputs_are_copied_not_kept(stand_in):
    call = recorded.RecordedCall(lambda x: x * 1)
    value = torch.ones(2)
    call(value)
    assert torch.equal(call(torch.zeros(2)), torch.zeros(2))
    assert torch.equal(value, torch.ones(2))  # the next call's input went into a static copy, not here
    value.fill_(5.0)  # the caller reusing its buffer cannot change the recording's input
    assert torch.equal(call(torch.full((2,), 3.0)), torch.full((2,), 3.0))


def test_without_cuda_or_a_stand_in_the_function_runs_as_it_is():
    assert not recorded.can_record(torch.device("cpu"))
    call = recorded.RecordedCall(lambda x: x + 1)
    first, second = call(torch.zeros(1)), call(torch.zeros(1))
    assert first is not second and call.recordings == 0


@pytest.mark.parametrize(("n", "size", "expected"), [
    (3, 3, [0, 1, 2]),   # full: unchanged
    (1, 3, [0, 0, 0]),   # one item repeated
    (2, 4, [0, 1, 1, 1]),
    (5, 3, [0, 1, 2, 3, 4]),  # never cut
])
def test_pad_to(n, size, expected):
    batch = torch.arange(float(n)).view(n, 1)
    assert recorded.pad_to(batch, size).view(-1).tolist() == expected


def test_tensor_leaves_walks_dataclasses_objects_and_containers():
    from dataclasses import dataclass

    class Bank:
        def __init__(self):
            self.entries = {"a": (torch.zeros(1), torch.ones(1))}

    @dataclass
    class Context:
        bank: Bank
        conditioning: torch.Tensor
        prototype: torch.Tensor | None
        shots: int

    leaves = recorded.tensor_leaves(Context(Bank(), torch.full((1,), 2.0), None, 1))
    assert [float(t) for t in leaves] == [0.0, 1.0, 2.0]
