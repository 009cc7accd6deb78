"""Random numbers a training loss takes from the host generator are drawn before the step
(``Method.host_draws``), so a step recorded as a CUDA graph reads fresh ones at every
replay. The case that needs it: SD-FSMIS under ``fidelity=code`` samples the VAE posterior
(``train_latents=sample``) from torch's CPU generator.

On the CPU a graph is stood in for by :class:`_Capturing`: it runs the recorded body with
``torch.cuda.is_current_stream_capturing()`` true, so a draw inside the step fails there as
it must on a GPU (the codec refuses it rather than freeze one draw into the graph).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL

from fsmis_bench.config import compose
from fsmis_bench.runner import build_method
from fsmis_bench.training.cuda_graph import EagerRecorder, GraphedTrainStep
from fsmis_bench.training.step import TrainStep
from fsmis_methods._sd_vae import KLCodec
from test_cuda_graph import STEPS
from test_engine_compute import TINY_SD, _close, _sampler


def _small_kl() -> KLCodec:
    """A 2-level KL-VAE (``d = 2``, 4 latent channels, as the identity codec it replaces)."""
    torch.manual_seed(5)
    vae = AutoencoderKL(block_out_channels=[16, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, latent_channels=4)
    return KLCodec(vae, random_weights=True)


def _sdfsmis_sampling(extra: tuple[str, ...] = ()):
    cfg = compose([*TINY_SD, "fidelity=code", "train.grad_accum=1", *extra, "device=cpu"])
    torch.manual_seed(0)
    method = build_method(cfg)
    method.vae = _small_kl()
    assert method.options.train_latents == "sample"
    return method


def _batches(n: int, batch_size: int = 1) -> list:
    sampler = _sampler()
    return [sampler.batch(batch_size) for _ in range(n)]


def test_codec_noise_is_the_draw_encode_makes():
    codec = _small_kl()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(3)
    drawn_inside = codec.encode(image, sample=True)
    torch.manual_seed(3)
    noise = codec.posterior_noise(image.shape)
    assert noise.shape == (2, 4, 16, 16)
    assert torch.equal(codec.encode(image, sample=True, noise=noise), drawn_inside)
    with pytest.raises(ValueError, match="posterior noise"):
        codec.encode(image, sample=True, noise=noise[:1])
    # drawn beforehand, it is an input: a recording may read it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert torch.equal(codec.encode(image, sample=True, noise=noise), drawn_inside)
        with pytest.raises(RuntimeError, match="host_draws"):
            codec.encode(image, sample=True)


def test_under_autocast_the_noise_takes_the_posterior_dtype():
    """With ``mixed_precision=bf16`` the posterior is bf16, and torch's CPU generator gives
    other bf16 values than fp32 ones at some sizes (9 x 9 latents here): the draw is made in
    the posterior's dtype, as ``latent_dist.sample()`` and the code before host_draws did."""
    codec = _small_kl()
    image = torch.rand(1, 3, 18, 18) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(2)
        ours = codec.encode(image, sample=True)
        posterior = codec.vae.encode(image).latent_dist
        torch.manual_seed(2)
        noise = torch.randn(posterior.mean.shape, dtype=posterior.mean.dtype)
        assert posterior.mean.dtype == torch.bfloat16
        assert torch.equal(ours, (posterior.mean + posterior.std * noise) * codec.scaling_factor)
    torch.manual_seed(2)
    assert not torch.equal(torch.randn(noise.shape).bfloat16(), noise)  # why the dtype matters

    # the engine draws under the step's autocast
    method = _sdfsmis_sampling()
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=0.0)
    step = TrainStep(method, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                     accelerator, grad_clip=0.0)
    (drawn,) = step.with_host_draws(_batches(1))
    AcceleratorState._reset_state(True)
    assert {t.dtype for t in drawn.host_draws.values()} == {torch.bfloat16}


def test_one_episode_batches_draw_what_the_codec_draws():
    """A run of one-episode micro-batches (the paper's batch 1, ``fidelity=code``'s
    accumulation) keeps the numbers of before ``host_draws``: the four encodes, each
    drawing its own noise in turn."""
    method = _sdfsmis_sampling()
    (batch,) = _batches(1)
    torch.manual_seed(4)
    drawn = method.episode_latents(batch, sample=True)
    torch.manual_seed(4)
    vae = method.vae
    codec_own = [vae.encode(images.expand(-1, 3, -1, -1), sample=True)
                 for images in (batch.support_images.flatten(0, 1), batch.support_masks.flatten(0, 1) * 2 - 1,
                                batch.query_images, batch.query_masks * 2 - 1)]
    for ours, theirs in zip(drawn, codec_own, strict=True):
        assert torch.equal(ours, theirs)


def test_a_batch_of_episodes_draws_what_one_episode_micro_batches_draw():
    """``train.accumulation=batched``: two episodes in one batch get the noise that two
    one-episode micro-batches get, so the mean loss is the sequential one."""
    method = _sdfsmis_sampling()
    sampler = _sampler()
    one_by_one = [sampler.batch(1) for _ in range(2)]
    sampler = _sampler()
    together = sampler.batch(2)
    torch.manual_seed(9)
    sequential = [float(method.training_loss(batch)) for batch in one_by_one]
    torch.manual_seed(9)
    batched = float(method.training_loss(together))
    assert _close([sum(sequential) / 2], [batched], 1e-5), (sequential, batched)


@pytest.mark.parametrize("extra", [(), ("method.joint_pass=true",)], ids=["two-pass", "joint"])
def test_drawing_before_the_step_leaves_the_numbers_as_they_were(extra):
    """Two micro-batches of two episodes: drawn inside the loss or by the engine before the
    step: the same losses and the same generator state after."""
    method = _sdfsmis_sampling(extra)
    batches = _batches(2, batch_size=2)
    torch.manual_seed(7)
    inside = [method.training_loss(batch).detach() for batch in batches]
    after_inside = torch.get_rng_state()

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=0.0)
    step = TrainStep(method, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                     accelerator, grad_clip=0.0)
    torch.manual_seed(7)
    drawn = step.with_host_draws(batches)
    assert torch.equal(torch.get_rng_state(), after_inside)
    assert list(drawn[0].host_draws) == ["support_images_noise", "support_masks_noise",
                                         "query_images_noise", "query_masks_noise"]
    assert drawn[0].host_draws["support_images_noise"].shape == (2, 4, 16, 16)
    before = [method.training_loss(batch).detach() for batch in drawn]
    assert [float(v) for v in before] == [float(v) for v in inside]
    # the draws matter: other noise, another loss
    assert float(method.training_loss(step.with_host_draws(batches[:1])[0])) != float(inside[0])
    AcceleratorState._reset_state(True)


def test_batched_encode_samples_the_four_calls_posteriors():
    """``method.batched_encode``: one VAE call whose noise is the four calls' noise, joined
    in their order, so each kind's rows get their own draws back (float64, 2 x 2 shots)."""
    four, one = (_sdfsmis_sampling((f"method.batched_encode={flag}",)).double() for flag in ("false", "true"))
    one.vae = four.vae  # the same random KL-VAE weights
    batch = _batches(1, batch_size=2)[0].apply(torch.Tensor.double)
    torch.manual_seed(4)
    batch = dataclasses.replace(batch, host_draws=one.host_draws(batch))
    sampled_four, sampled_one = four.episode_latents(batch, sample=True), one.episode_latents(batch, sample=True)
    means = four.episode_latents(batch, sample=False)
    for a, b, mean in zip(sampled_four, sampled_one, means):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(a, mean)  # the posterior noise is in there


def test_methods_without_host_draws_leave_batches_alone():
    method = _sdfsmis_sampling()
    method.options = type(method.options)(**{**vars(method.options), "train_latents": "mean"})
    batch = _batches(1)[0]
    state = torch.get_rng_state()
    assert method.host_draws(batch) == {}
    assert torch.equal(torch.get_rng_state(), state)


class _Capturing(EagerRecorder):
    """Replays run the body as if a CUDA graph were being recorded, so a host draw in it
    raises (a real graph would replay the recording's one draw instead)."""

    def _as_captured(self, run):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
            return run()

    def replay(self) -> None:
        self._as_captured(super().replay)


def test_a_recorded_sampling_step_reads_fresh_noise_at_every_replay():
    """``fidelity=code`` (posterior samples): three eager steps, then recorded and replayed,
    against the plain step on the same batches and seed."""
    batches = _batches(STEPS)

    def losses(recorder) -> tuple[list[float], TrainStep]:
        AcceleratorState._reset_state(True)
        accelerator = Accelerator(cpu=True)
        method = _sdfsmis_sampling()
        optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        step = (GraphedTrainStep(method, optimizer, scheduler, accelerator, grad_clip=1.0, recorder=recorder)
                if recorder else TrainStep(method, optimizer, scheduler, accelerator, grad_clip=1.0))
        torch.manual_seed(11)
        out = [step([batch]).item() for batch in batches]
        AcceleratorState._reset_state(True)
        return out, step

    plain, _ = losses(None)
    graphed, step = losses(lambda device, unset: _Capturing(device, unset))
    assert step.graphed and step.fell_back is None
    assert _close(plain, graphed, 1e-5), (plain, graphed)
