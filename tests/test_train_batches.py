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
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, model.weight.detach() - 1.0)
    other = EMA(torch.nn.Linear(2, 1), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.model.weight, ema.model.weight)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EMA(model, decay=1.0)
