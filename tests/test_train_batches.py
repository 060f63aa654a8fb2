import pytest
import torch
from torch.utils.data import DataLoader

from difflab.train.batches import CheckedDataset, ShardSampler, ShardSchedule
from difflab.train.ema import EMA


def test_every_epoch_is_a_permutation_and_steps_continue_across_epochs():
    schedule = ShardSchedule(size=10, batch_size=4, accumulate=1, world_size=1, seed=0)
    stream = [i for step in range(5) for i in schedule.indices(step, 0)]  # 20 = two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new order each epoch
    assert schedule.position(3) == {"epoch": 1, "index": 2, "examples_seen": 12}


def test_order_depends_only_on_seed_and_step():
    a = ShardSchedule(50, 8, 1, 1, seed=3)
    b = ShardSchedule(50, 8, 1, 1, seed=3)
    late_first = b.indices(9, 0)  # b jumps straight to step 9, as a resumed run does
    assert [a.indices(s, 0) for s in range(10)][9] == late_first
    assert ShardSchedule(50, 8, 1, 1, seed=4).indices(0, 0) != a.indices(0, 0)


def test_processes_and_accumulation_cut_the_same_global_batch():
    """Shard j = k * world + rank: 2 processes x 1 micro-batch read what 1 process x 2 reads."""
    one = ShardSchedule(100, 12, accumulate=2, world_size=1, seed=0)
    two = ShardSchedule(100, 12, accumulate=1, world_size=2, seed=0)
    four = ShardSchedule(100, 12, accumulate=2, world_size=2, seed=0)
    for step in range(3):
        whole = one.indices(step, 0) + one.indices(step, 1)
        assert [two.indices(step, r) for r in range(2)] == [one.indices(step, 0), one.indices(step, 1)]
        assert sum((four.indices(step, j) for j in range(4)), []) == whole
        assert len(set(whole)) == 12


def test_sampler_yields_this_ranks_micro_batches_from_the_start_step():
    schedule = ShardSchedule(30, 8, accumulate=2, world_size=2, seed=1)
    batches = list(ShardSampler(schedule, rank=1, start=2, stop=4))
    assert batches == [schedule.indices(2, 1), schedule.indices(2, 3), schedule.indices(3, 1), schedule.indices(3, 3)]
    assert len(ShardSampler(schedule, 1, 2, 4)) == 4


def test_batch_size_must_split_evenly():
    with pytest.raises(ValueError, match="batch_size = 10 .* 2 x 2 = 4"):
        ShardSchedule(100, 10, accumulate=2, world_size=2, seed=0)
    with pytest.raises(ValueError, match="empty"):
        ShardSchedule(0, 4, 1, 1, 0)


class Flaky(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 1:
            raise OSError("truncated file")
        x = torch.full((1, 2, 2), float(i))
        if i == 2:
            x[0, 0, 0] = float("nan")
        return {"x": x}


def test_bad_items_raise_naming_the_index_or_are_skipped_deterministically():
    with pytest.raises(ValueError, match="data item 1 .*truncated.*on_bad_image"):
        CheckedDataset(Flaky(), "raise")[1]
    with pytest.raises(ValueError, match="data item 2 .*NaN"):
        CheckedDataset(Flaky(), "raise")[2]
    skipping = CheckedDataset(Flaky(), "skip")
    with pytest.warns(UserWarning) as record:
        values = [skipping[i]["x"][0, 0, 1].item() for i in range(4)]
    assert values == [0.0, 3.0, 3.0, 3.0]
    assert [str(w.message).split(":")[0] for w in record] == ["skipping bad data item 1", "skipping bad data item 2"]
    loader = DataLoader(skipping, batch_size=4)
    assert next(iter(loader))["x"].shape == (4, 1, 2, 2)
    with pytest.raises(ValueError, match="on_bad_image"):
        CheckedDataset(Flaky(), "ignore")


def test_ema_follows_the_warmup_formula():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.99, warmup=True)
    expected = torch.zeros(1, 2)
    for n in range(30):
        with torch.no_grad():
            model.weight.fill_(n + 1.0)
        d = min(0.99, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        expected = d * expected + (1 - d) * model.weight.detach()
    torch.testing.assert_close(ema.model.weight, expected)
    assert not ema.model.weight.requires_grad


def test_ema_without_warmup_and_its_state():
    """decay 0.9 (not 0.5, where d = 1 - d): one update moves the shadow 10% of the way, not 90%."""
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.9, warmup=False)
    before = ema.model.weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    assert ema.current_decay() == 0.9  # no warmup: the decay from the first update on
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, before + 0.2, rtol=0, atol=1e-6)  # 0.9 * w + 0.1 * (w + 2)
    other = EMA(torch.nn.Linear(2, 1), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.model.weight, ema.model.weight)
    assert torch.equal(other.model.bias, ema.model.bias)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            EMA(model, decay=bad)


def test_ema_decay_zero_is_a_plain_copy_and_the_shadow_is_a_frozen_eval_copy():
    """The edge of the allowed range: d = 0 copies the weights at every update."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    ema = EMA(model, decay=0.0, warmup=False)
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())  # the original is untouched
    with torch.no_grad():
        model[0].weight.mul_(3.0).add_(1.0)
    assert not torch.equal(ema.model[0].weight, model[0].weight)  # a copy, not the same tensors
    ema.update(model)
    assert torch.equal(ema.model[0].weight, model[0].weight) and ema.num_updates == 1


class Normed(torch.nn.Module):
    """A model with buffers: batch-norm running statistics and its step counter."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.norm = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(self.lin(x))


def test_ema_copies_buffers_as_they_are_and_averages_only_parameters():
    torch.manual_seed(0)
    model = Normed().train()
    ema = EMA(model, decay=0.9, warmup=False)
    old_weight = ema.model.lin.weight.detach().clone()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3) * 4 + 2)  # moves running_mean / running_var, counts batches
        model.lin.weight.add_(1.0)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    shadow_before = dict(ema.model.named_buffers())
    # the test can fail: the buffers moved away from the shadow's
    assert not torch.equal(shadow_before["norm.running_mean"], buffers["norm.running_mean"])
    ema.update(model)
    for name, shadow in ema.model.named_buffers():
        assert torch.equal(shadow, buffers[name]), name  # copied, not averaged
    assert int(ema.model.norm.num_batches_tracked) == 3
    torch.testing.assert_close(ema.model.lin.weight, old_weight + 0.1, rtol=0, atol=1e-6)
    # the buffers travel with the state too
    other = EMA(Normed(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    for name, shadow in other.model.named_buffers():
        assert torch.equal(shadow, buffers[name]), name


def test_ema_refuses_a_model_that_does_not_match_its_shadow():
    """A model with a tensor fewer is an error, not a silently half-averaged shadow."""
    ema = EMA(Normed(), decay=0.9)
    no_bias = Normed()
    no_bias.lin = torch.nn.Linear(3, 3, bias=False)  # one parameter fewer
    with pytest.raises(ValueError, match="zip"):
        ema.update(no_bias)
    no_stats = Normed()
    no_stats.norm = torch.nn.BatchNorm1d(3, track_running_stats=False)  # same parameters, no buffers
    with pytest.raises(ValueError, match="zip"):
        ema.update(no_stats)


def test_ema_state_restores_the_warmup_position():
    """num_updates is state: a restored EMA continues the warmup where it was, not from 0."""
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.999, warmup=True)
    for _ in range(5):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(6 / 15)  # (1 + n) / (10 + n) at n = 5
    fresh = EMA(model, decay=0.999, warmup=True)
    assert fresh.current_decay() == pytest.approx(1 / 10)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.current_decay() == pytest.approx(6 / 15) and fresh.num_updates == 5
    assert EMA(model, decay=0.3).current_decay() == 0.1  # warmup by default; min(decay, ...) picks it
    late = EMA(model, decay=0.3, warmup=True)
    late.num_updates = 100
    assert late.current_decay() == 0.3  # and the decay once the warmup has passed it
