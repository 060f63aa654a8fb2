"""The per-step progress callback of `sample_batched` and `Pipeline.generate` (what `difflab
serve` shows and cancels through): called once per sampler step of every batch with
(done, total), and an exception raised from it stops sampling there."""

from __future__ import annotations

import pytest
import torch

from difflab.denoiser import NetworkDenoiser
from difflab.nets import UNet
from difflab.pipelines import Pipeline, new_manifest, sample_batched
from difflab.schedules import Schedule


class Counting(NetworkDenoiser):
    """A network denoiser that counts its calls."""

    calls = 0

    def predict(self, x_t, t, cond):
        Counting.calls += 1
        return super().predict(x_t, t, cond)


def _pipeline() -> Pipeline:
    torch.manual_seed(0)
    net = UNet(in_channels=1, model_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[],
               norm_groups=4).eval()  # fmt: skip
    schedule = Schedule.make("cosine", T=100)
    manifest = new_manifest(schedule=schedule.to_config(), prediction="eps", variance="fixed_small",
                            sample_shape=[1, 8, 8], thresholding="static")  # fmt: skip
    return Pipeline(Counting(net, schedule, "eps", sample_shape=(1, 8, 8)), manifest)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "heun", "dpmpp_2m"])
def test_the_callback_sees_every_step_of_every_batch_in_order(sampler):
    pipe = _pipeline()
    seen = []
    x = pipe.generate(5, steps=4, sampler=sampler, batch_size=2, callback=lambda *progress: seen.append(progress))
    assert x.shape == (5, 1, 8, 8)
    assert seen == [(k, 12) for k in range(1, 13)]  # 3 batches x 4 steps


def test_the_callback_changes_nothing_in_the_samples():
    pipe = _pipeline()
    quiet = pipe.generate(3, steps=3, seed=5)
    assert torch.equal(quiet, pipe.generate(3, steps=3, seed=5, callback=lambda done, total: None))
    assert pipe(2, steps=2, output_type="pt", callback=lambda done, total: None).shape == (2, 1, 8, 8)  # __call__ too


def test_raising_from_the_callback_stops_sampling_at_that_step():
    pipe = _pipeline()

    class Stop(Exception):
        pass

    def stop_at_3(done, total):
        if done == 3:
            raise Stop

    Counting.calls = 0
    with pytest.raises(Stop):
        pipe.generate(4, steps=50, sampler="ddim", callback=stop_at_3)
    assert Counting.calls == 3  # three network calls, not fifty
    Counting.calls = 0
    pipe.generate(4, steps=50, sampler="ddim")  # control: without it all fifty run
    assert Counting.calls == 50


def test_sample_batched_reports_the_total_of_a_respaced_run():
    pipe = _pipeline()
    denoiser, cond = pipe.condition(3)
    seen = []
    sample_batched(denoiser, 3, "ddim", None, spacing="ddim7", batch_size=3, callback=lambda d, t: seen.append((d, t)))
    assert seen == [(k, 7) for k in range(1, 8)]
