"""Checkpoint I/O (safetensors + JSON, no pickle) and the stop-request flag, in isolation."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from fsmis_bench.training.checkpoint import (
    CheckpointError, clear_training_state, load_training_state, read_safetensors, save_training_state,
)
from fsmis_bench.records import remove_unfinished_writes
from fsmis_bench.training.interrupt import Interrupted, StopRequest


def _optimiser_state() -> dict:
    weight = torch.nn.Parameter(torch.randn(3, 2))
    optimiser = torch.optim.AdamW([weight], lr=1e-3)
    weight.sum().backward()
    optimiser.step()
    return optimiser.state_dict()


@pytest.mark.parametrize("value", [
    torch.arange(6, dtype=torch.float32).reshape(2, 3),
    torch.get_rng_state(),  # uint8
    torch.tensor(3.5),  # 0-d, like AdamW's step
    torch.zeros(0),
    np.arange(4, dtype=np.int64),
    {0: "int keys", 1: [1.5, None, True]},
    (0.9, 0.999),
    {"state": {"state": 2**127 + 5, "inc": 7}},  # a numpy bit generator's 128-bit ints
    [{"step": 2, "loss": float("nan")}],
], ids=["tensor", "rng_uint8", "scalar", "empty", "ndarray", "int_keys", "tuple", "big_int", "nan"])
def test_state_round_trips_exactly(value, tmp_path):
    save_training_state(tmp_path, {"step": 4, "value": value})
    loaded = load_training_state(tmp_path)["value"]
    if isinstance(value, torch.Tensor):
        assert loaded.dtype == value.dtype and torch.equal(loaded, value)
    elif isinstance(value, np.ndarray):
        assert loaded.dtype == value.dtype and np.array_equal(loaded, value)
    elif isinstance(value, list) and isinstance(value[0], dict):
        assert loaded[0]["step"] == 2 and np.isnan(loaded[0]["loss"])
    else:
        assert loaded == value and type(loaded) is type(value)


def test_optimiser_state_and_shared_tensors_round_trip(tmp_path):
    state = _optimiser_state()
    shared = torch.ones(4)
    save_training_state(tmp_path, {"step": 1, "optimizer": state, "a": shared, "b": shared[:2]})
    loaded = load_training_state(tmp_path)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(loaded["b"], torch.ones(2))


def test_a_new_state_replaces_the_old_pair_and_clear_removes_it(tmp_path):
    save_training_state(tmp_path, {"step": 4, "w": torch.zeros(2)})
    save_training_state(tmp_path, {"step": 8, "w": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-00000008.safetensors", "last.json"]
    assert load_training_state(tmp_path)["step"] == 8
    clear_training_state(tmp_path)
    assert list(tmp_path.iterdir()) == [] and load_training_state(tmp_path) is None


def test_unfinished_writes_are_removed_and_nothing_else(tmp_path):
    """The temporary files a killed write leaves (``.<name>.tmp-<pid>``) go; the resume
    state and any other file, hidden or not, stay."""
    save_training_state(tmp_path, {"step": 4, "w": torch.zeros(2)})
    leftovers = [tmp_path / ".last-00000008.safetensors.tmp-4242", tmp_path / ".last.json.tmp-4242"]
    for path in leftovers:
        path.write_bytes(b"partial")
    (tmp_path / ".keep").write_text("x")
    (tmp_path / "notes.tmp-1").write_text("x")  # not hidden: not a write of ours
    assert remove_unfinished_writes(tmp_path) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "last-00000004.safetensors", "last.json",
                                                          "notes.tmp-1"]
    assert load_training_state(tmp_path)["step"] == 4
    assert remove_unfinished_writes(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "last.json").write_text("{not json"), "is damaged"),
    (lambda d: (d / "last.json").write_text(json.dumps({"format": "x"})), "not an fsmis-bench resume state"),
    (lambda d: (d / "last.json").write_text(json.dumps({"format": "fsmis-bench", "kind": "training-state",
                                                        "tensors": "../evil.safetensors", "state": {}})),
     "unexpected tensor file"),
    (lambda d: (d / "last-00000004.safetensors").write_bytes(b"\x80\x04 truncated"), "is a pickle"),
    (lambda d: (d / "last-00000004.safetensors").unlink(), "does not exist"),
], ids=["json", "format", "traversal", "pickle_bytes", "missing_tensors"])
def test_a_damaged_resume_state_is_refused_with_a_hint(damage, message, tmp_path):
    save_training_state(tmp_path, {"step": 4, "w": torch.zeros(2)})
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_training_state(tmp_path)


def test_damaged_resume_tensors_get_the_hint_to_delete_the_state(tmp_path):
    save_training_state(tmp_path, {"step": 4, "w": torch.zeros(2)})
    tensors = tmp_path / "last-00000004.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:20])  # truncated
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint") as caught:
        load_training_state(tmp_path)
    assert caught.value.hint == (f"delete {tensors} and {tmp_path / 'last.json'}, then rerun the same command: "
                                 "this training restarts from step 0")


@pytest.mark.parametrize("fails", ["tensors", "json"])
def test_a_full_disk_is_an_oserror_and_the_previous_state_stays(fails, tmp_path, monkeypatch):
    """A failed write comes out as the OSError it was, naming the file, with no temporary or
    orphaned file left."""
    import errno

    from fsmis_bench.training import checkpoint

    save_training_state(tmp_path, {"step": 4, "w": torch.zeros(2)})

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_text(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_tensor_file" if fails == "tensors" else "_write_text",
                        full if fails == "tensors" else full_text)
    with pytest.raises(OSError) as caught:
        save_training_state(tmp_path, {"step": 8, "w": torch.ones(2)})
    assert caught.value.errno == errno.ENOSPC
    if fails == "tensors":
        assert caught.value.filename == str(tmp_path / "last-00000008.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-00000004.safetensors", "last.json"]
    monkeypatch.undo()
    assert load_training_state(tmp_path)["step"] == 4


def test_the_tensor_file_writer_round_trips_every_dtype_shared_storage_and_odd_shapes(tmp_path):
    """fsmis-bench writes safetensors itself (streaming each tensor's bytes, so views of one
    storage are fine); safetensors' own reader must read back exactly what went in."""
    from safetensors import safe_open

    from fsmis_bench.training import checkpoint

    chunk = torch.arange(64, dtype=torch.uint8)
    tensors = {
        "f32": torch.randn(3, 5), "f64": torch.randn(2, dtype=torch.float64), "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(1, 3).half(), "i64": torch.tensor(9), "i32": torch.arange(5, dtype=torch.int32),
        "u8": torch.arange(3, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6)[:, ::2],
        "view_a": chunk[0:8].view(torch.float32), "view_b": chunk[16:24].view(torch.int16),  # one storage
        "u16": torch.arange(4, dtype=torch.int32).to(torch.uint16), "f8": torch.randn(3).to(torch.float8_e4m3fn),
        "nhwc": torch.randn(1, 3, 2, 2).contiguous(memory_format=torch.channels_last),
    }
    path = tmp_path / "t.safetensors"
    checkpoint.write_tensor_file(tensors, str(path), metadata={"step": "3"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"step": "3"}
        assert set(f.keys()) == set(tensors)
        for key, tensor in tensors.items():
            back = f.get_tensor(key)
            assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor), key
    with pytest.raises(TypeError, match="complex64"):
        checkpoint.write_tensor_file({"c": torch.zeros(2, dtype=torch.complex64)}, str(tmp_path / "c"))


@pytest.mark.parametrize("fails", ["open", "chmod", "json"])
def test_a_refused_write_names_the_checkpoint_not_its_temporary_file(fails, tmp_path, monkeypatch):
    """open() and chmod() of the hidden temporary file fail naming it; the user is told the
    file they know."""
    import errno

    from fsmis_bench.training import checkpoint

    def refuse(target, *args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(target))

    if fails == "open":
        monkeypatch.setattr(checkpoint, "write_tensor_file", lambda tensors, filename, metadata=None: refuse(filename))
    elif fails == "chmod":
        monkeypatch.setattr(checkpoint.os, "chmod", refuse)
    else:
        monkeypatch.setattr(type(tmp_path), "write_text", lambda self, text: refuse(self))
    with pytest.raises(PermissionError) as caught:
        save_training_state(tmp_path, {"step": 2, "w": torch.zeros(2)})
    named = "last.json" if fails == "json" else "last-00000002.safetensors"
    assert caught.value.filename == str(tmp_path / named) and caught.value.errno == errno.EPERM
    assert not list(tmp_path.glob(".*"))  # no temporary file left


@pytest.mark.parametrize("metadata, tensors, match", [
    ({"step": 3}, {"w": torch.zeros(1)}, "text to text"),
    (None, {"__metadata__": torch.zeros(1)}, "__metadata__"),
])
def test_the_tensor_file_writer_refuses_what_safetensors_could_not_read(metadata, tensors, match, tmp_path):
    from fsmis_bench.training import checkpoint

    with pytest.raises(TypeError, match=match):
        checkpoint.write_tensor_file(tensors, str(tmp_path / "t"), metadata=metadata)
    assert not (tmp_path / "t").exists()


def test_bit_sum_is_exact_whatever_the_layout_and_dtype():
    from fsmis_bench.training.checkpoint import bit_sum

    nchw = torch.randn(2, 3, 4, 5)
    assert int(bit_sum(nchw)) == int(bit_sum(nchw.contiguous(memory_format=torch.channels_last)))
    assert int(bit_sum(nchw)) == int(bit_sum(nchw.flip(0)))  # the order of the additions does not matter
    changed = nchw.clone()
    changed[1, 2, 3, 4] = torch.nextafter(changed[1, 2, 3, 4], torch.tensor(float("inf")))  # one ulp
    assert int(bit_sum(changed)) != int(bit_sum(nchw))
    for tensor in (torch.tensor(True), torch.tensor(3.0), torch.zeros(0, 3), torch.randn(5).bfloat16(),
                   torch.randn(5).to(torch.float8_e4m3fn), torch.arange(4, dtype=torch.int32).to(torch.uint16),
                   torch.tensor([2**62, 2**62, 2**62], dtype=torch.int64)):  # the last wraps
        assert bit_sum(tensor).dtype == torch.int64 and bit_sum(tensor).dim() == 0


@pytest.mark.parametrize("damage", ["copy never landed", "flipped byte on disk"])
def test_a_resume_state_that_does_not_hold_the_saved_values_is_refused(damage, tmp_path):
    """last.json keeps each tensor's checksum, taken from the live state (on its device);
    a state whose file holds other values, from a faulty host copy (the page-locked bug of
    the eighth H100 session) or a damaged disk, is refused, never resumed from."""
    from fsmis_bench.training import checkpoint

    state = {"step": 5, "w": torch.randn(64), "b": torch.randn(8), "rng": torch.arange(4, dtype=torch.uint8)}
    if damage == "copy never landed":
        class LostCopy(checkpoint.HostStaging):
            def synchronize(self):
                self._buffers["state/b"].zero_()  # this copy did not land

        writer = checkpoint.CheckpointWriter(tmp_path, background=True)
        writer.staging = LostCopy(pinned=False)
        writer.save(state)
        writer.close()
    else:
        save_training_state(tmp_path, state)
        tensor_file = next(tmp_path.glob("last-*.safetensors"))
        data = bytearray(tensor_file.read_bytes())
        data[-3] ^= 0x10  # in the last tensor's bytes
        tensor_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not hold the state that was saved") as caught:
        load_training_state(tmp_path)
    assert "restart this training from step 0" in caught.value.hint
    save_training_state(tmp_path, state)  # a sound state loads
    assert torch.equal(load_training_state(tmp_path)["b"], state["b"])


def test_a_resume_state_without_checksums_still_loads(tmp_path):
    """States written before the checksums existed resume as before."""
    save_training_state(tmp_path, {"step": 2, "w": torch.ones(3)})
    document = json.loads((tmp_path / "last.json").read_text())
    assert set(document["checksums"]) == {"state/w"}
    del document["checksums"]
    (tmp_path / "last.json").write_text(json.dumps(document))
    assert torch.equal(load_training_state(tmp_path)["w"], torch.ones(3))


def test_a_background_save_writes_the_staged_copies_only_after_they_landed(tmp_path, monkeypatch):
    """With CUDA, the page-locked copies are queued and land at ``synchronize``; all of a
    state's buffers are views of the same chunks. The encoding once cloned every view after
    the first (safetensors refuses shared storage) before the copies had landed, and an H100
    wrote a resume state of stale bytes (``gpu_checkpoint_pinned_h100.json``). Here the
    stand-in staging fills its chunk views only when it synchronises, as the GPU does."""
    from fsmis_bench.training import checkpoint

    class LateCopies(checkpoint.HostStaging):
        def __init__(self):
            super().__init__(pinned=True, chunk_bytes=4096)
            self.queued = []

        def _allocate(self, nbytes):
            return torch.full((nbytes,), 0xAB, dtype=torch.uint8)  # what an unfilled buffer holds

        def copy(self, key, tensor):
            buffer = self._buffers[key] = self._carve(tensor.shape, tensor.dtype)
            self.queued.append((buffer, tensor.clone()))
            return buffer

        def synchronize(self):
            for buffer, tensor in self.queued:
                buffer.copy_(tensor)
            self.queued.clear()

    writer = checkpoint.CheckpointWriter(tmp_path, background=True)
    writer.staging = LateCopies()
    state = {"step": 3, "w": torch.randn(4, 3), "b": torch.randn(5), "m": [torch.arange(6), torch.ones(2).bfloat16()]}
    writer.save(state)
    chunks = {b.untyped_storage().data_ptr() for b in writer.staging._buffers.values()}
    assert len(writer.staging._buffers) == 4 and len(chunks) == 1  # the buffers really are views of one chunk
    writer.close()
    loaded = load_training_state(tmp_path)
    for key in ("w", "b"):
        assert torch.equal(loaded[key], state[key]), key
    assert torch.equal(loaded["m"][0], state["m"][0]) and torch.equal(loaded["m"][1], state["m"][1])


def test_read_safetensors_refuses_a_torch_save_file_without_loading_it(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model/w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="pickle .*never loads pickles"):
        read_safetensors(path)


def test_stop_request_turns_signals_into_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM  # the process is still alive, with a flag set
        error = stop.stop()
    assert isinstance(error, Interrupted) and isinstance(error, KeyboardInterrupt) and error.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_ctrl_c_stops_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_other_signals_plug_in():
    with StopRequest(signals=(signal.SIGUSR1,)) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.received == signal.SIGUSR1 and stop.stop().exit_code == 128 + signal.SIGUSR1


def test_the_gpu_checkpoint_script_runs_on_cpu(tmp_path, monkeypatch, capsys):
    import runpy
    import sys

    script = __import__("pathlib").Path(__file__).parents[1] / "benchmarks" / "gpu_checkpoint_check.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--params", "2e5", "--out", str(tmp_path / "c")])
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["next_step_identical"] and result["rng_identical"] and result["parameters_m"] == 0.2
    assert result["background_state_identical"] and 0 <= result["background_stall_s"] <= result["background_total_s"]
    background = result["background"]
    assert {"pageable", "pinned_first", "pinned"} <= set(background) and background["pinned_buffers_gb"] > 0
    assert all(background[kind]["identical"] for kind in ("pageable", "pinned_first", "pinned"))


# -- background writes (train.async_checkpoint) ----------------------------------------------
def test_a_background_save_holds_the_state_of_its_step(tmp_path, monkeypatch):
    """Training goes on changing the weights and moments while the thread writes: what lands
    on disk is the state at the save, not a later one."""
    import threading

    from fsmis_bench.training import checkpoint

    release, real_write = threading.Event(), checkpoint.write_tensor_file

    def slow_disk(tensors, filename, metadata=None):
        assert release.wait(10)  # the write starts only after training has moved on
        return real_write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "write_tensor_file", slow_disk)
    weights, moments = torch.zeros(3), _optimiser_state()
    writer = checkpoint.CheckpointWriter(tmp_path, background=True)
    writer.save({"step": 4, "w": weights, "optimizer": moments, "rng": torch.get_rng_state()})
    weights += 1  # the next steps, in place, as an optimiser updates
    moments["state"][0]["exp_avg"].mul_(0)
    release.set()
    writer.wait()
    writer.close()
    loaded = load_training_state(tmp_path)
    assert loaded["step"] == 4 and torch.equal(loaded["w"], torch.zeros(3))
    assert loaded["optimizer"]["state"][0]["exp_avg"].abs().sum() > 0


def test_background_saves_reuse_their_host_buffers_and_each_file_holds_its_state(tmp_path):
    """The host copies go into buffers kept between saves (a save waits for the write before
    it, so overwriting them is safe); a tensor that changed shape gets a buffer of its own."""
    from fsmis_bench.training import checkpoint

    weights, bias = torch.arange(6.0).reshape(2, 3).t(), torch.zeros(2)  # a strided tensor too
    writer = checkpoint.CheckpointWriter(tmp_path, background=True)
    writer.save({"step": 1, "w": weights, "b": bias})
    writer.wait()
    first = load_training_state(tmp_path)
    buffers = {key: buffer.data_ptr() for key, buffer in writer.staging._buffers.items()}
    assert torch.equal(first["w"], weights) and torch.equal(first["b"], bias)
    assert writer.staging.nbytes == (6 + 2) * 4 and not writer.staging.page_locked  # CPU tensors: ordinary memory
    weights.mul_(-1)
    writer.save({"step": 2, "w": weights, "b": torch.ones(5)})
    writer.wait()
    second = load_training_state(tmp_path)
    assert second["step"] == 2 and torch.equal(second["w"], weights) and torch.equal(second["b"], torch.ones(5))
    after = {key: buffer.data_ptr() for key, buffer in writer.staging._buffers.items()}
    assert after["state/w"] == buffers["state/w"] and after["state/b"] != buffers["state/b"]
    writer.close()
    assert writer.staging.nbytes == 0  # released with the writer


def test_host_staging_packs_page_locked_buffers_into_chunks(monkeypatch):
    """Page-locked buffers are aligned views into chunks filled in order (torch's pinned
    allocator would round each of hundreds of allocations up to a power of two); a tensor
    that does not fit the rest of a chunk starts the next, one larger than a chunk gets its
    own (a power of two), and no two buffers overlap."""
    from fsmis_bench.training import checkpoint

    allocated = []
    staging = checkpoint.HostStaging(pinned=True, chunk_bytes=4096)
    monkeypatch.setattr(staging, "_allocate", lambda n: allocated.append(n) or torch.zeros(n, dtype=torch.uint8))
    shapes = [((10,), torch.float32), ((3, 5), torch.float16), ((700,), torch.float32), ((3000,), torch.float32),
              ((1,), torch.int64), ((0,), torch.float32)]
    buffers = [staging._carve(torch.Size(shape), dtype) for shape, dtype in shapes]
    assert [tuple(b.shape) for b in buffers] == [shape for shape, _ in shapes]
    assert [b.dtype for b in buffers] == [dtype for _, dtype in shapes]
    # 40 B at 0, 30 B at 256, 2800 B at 512 of the first chunk; 12000 B fit no chunk: one of
    # 16384 B, where the 8 B of the int64 follow them (at 12032)
    assert allocated == [4096, 16384]
    assert buffers[4].untyped_storage().data_ptr() == buffers[3].untyped_storage().data_ptr()  # the same chunk
    offsets = [b.data_ptr() - b.untyped_storage().data_ptr() for b in buffers[:5]]  # the empty one has no address
    assert offsets == [0, 256, 512, 0, 12032] and all(o % checkpoint.HostStaging.ALIGN == 0 for o in offsets)
    for value, buffer in enumerate(buffers, start=1):
        buffer.fill_(value)
    assert [int(b.flatten()[0]) for b in buffers if b.numel()] == [1, 2, 3, 4, 5]  # nothing overwritten
    assert staging.reserved_bytes == sum(allocated)
    staging.release()
    assert staging.reserved_bytes == 0 and staging.nbytes == 0
    # an empty tensor first locks nothing: the first chunk comes with the first byte
    empty = staging._carve(torch.Size((0, 4)), torch.float32)
    assert tuple(empty.shape) == (0, 4) and allocated == [4096, 16384] and staging.reserved_bytes == 0
    staging._carve(torch.Size((2,)), torch.float32)
    assert allocated == [4096, 16384, 4096]


def test_host_staging_falls_back_to_ordinary_memory_when_none_can_be_page_locked(monkeypatch):
    """A host short of page-locked memory still gets its background saves, as before."""
    from types import SimpleNamespace

    from fsmis_bench.training import checkpoint

    real_empty = torch.empty

    def no_locked_memory(*shape, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real_empty(*shape, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "empty", no_locked_memory)
    staging = checkpoint.HostStaging(pinned=True)
    like_cuda = SimpleNamespace(shape=torch.Size([4]), dtype=torch.float16, device=torch.device("cuda"))
    buffer = staging._empty(like_cuda)
    assert buffer.shape == (4,) and buffer.dtype == torch.float16 and not staging.pinned


def test_a_failed_background_write_is_raised_by_wait_and_keeps_the_state_before(tmp_path, monkeypatch):
    import errno

    from fsmis_bench.training import checkpoint

    writer = checkpoint.CheckpointWriter(tmp_path, background=True)
    writer.save({"step": 4, "w": torch.zeros(2)})
    writer.wait()

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_tensor_file", full)
    writer.save({"step": 8, "w": torch.ones(2)})  # returns at once: the failure comes later
    with pytest.raises(OSError) as caught:
        writer.wait()
    assert caught.value.errno == errno.ENOSPC
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-00000004.safetensors", "last.json"]
    assert load_training_state(tmp_path)["step"] == 4


def test_close_on_a_raising_path_waits_without_replacing_the_error(tmp_path, monkeypatch):
    from fsmis_bench.training import checkpoint

    def broken(tensors, filename, metadata=None):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint, "write_tensor_file", broken)
    writer = checkpoint.CheckpointWriter(tmp_path, background=True)
    with pytest.raises(KeyError):  # the error the training path raised stays the one raised
        try:
            writer.save({"step": 1, "w": torch.zeros(2)})
            raise KeyError("the training's own error")
        finally:
            writer.close()
    assert list(tmp_path.glob("last*")) == []


def test_a_resume_state_reaches_the_disk_before_the_file_that_names_it(tmp_path, monkeypatch):
    """A machine that goes down (not only a killed process) must never leave ``last.json``
    naming a state file whose bytes were not yet written: each file is flushed before its
    rename, and its folder after it."""
    from fsmis_bench import records

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(str(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(records.os, "fsync", fsync)
    monkeypatch.setattr(records.os, "replace", replace)
    save_training_state(tmp_path, {"step": 2, "weights": torch.ones(3)})
    renamed = [name for kind, name in events if kind == "replace"]
    assert renamed[-1] == "last.json" and len(renamed) >= 2  # the state file first, then the file naming it
    for name in renamed:
        at = events.index(("replace", name))
        flushed = events[at - 1]
        assert flushed[0] == "fsync" and os.path.basename(flushed[1]).startswith(f".{name}")  # its own bytes
        assert events[at + 1] == ("fsync", str(tmp_path))  # then the folder holding the new name
    assert load_training_state(tmp_path)["step"] == 2
