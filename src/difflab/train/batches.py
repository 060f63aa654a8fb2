"""Which examples every process sees at every step: a pure function of (seed, step).

The data set is read as an endless stream of epochs, each a permutation drawn from
(seed, epoch). Step s takes the next `batch_size` examples of that stream, cut into
`accumulate * world_size` equal shards; shard j = k * world_size + rank is what process
`rank` uses for its k-th accumulation micro-batch. Because nothing depends on how many steps
ran before in this process, a resumed run reads exactly what an uninterrupted one would, and
2 processes x 1 micro-batch read the same shards as 1 process x 2 micro-batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from difflab.data.seeding import derive_seed

ORDER_STREAM = 1  # derive_seed(seed, ORDER_STREAM, epoch): keeps data order apart from other draws


class ShardSchedule:
    """The index lists of every (step, shard) of a run."""

    def __init__(self, size: int, batch_size: int, accumulate: int, world_size: int, seed: int):
        shards = accumulate * world_size
        if size < 1:
            raise ValueError(f"the data set is empty; a run needs at least one example, got size {size}")
        if batch_size % shards:
            raise ValueError(
                f"train.batch_size = {batch_size} must be a multiple of accumulate x processes = "
                f"{accumulate} x {world_size} = {shards}"
            )
        self.size, self.batch_size, self.accumulate = size, batch_size, accumulate
        self.world_size, self.seed = world_size, seed
        self.shard_size = batch_size // shards
        self._epoch, self._order = -1, []

    def permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, ORDER_STREAM, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._order

    def position(self, step: int) -> dict[str, int]:
        """Where step `step` (0-based) starts reading: epoch, index within it, examples seen."""
        seen = step * self.batch_size
        return {"epoch": seen // self.size, "index": seen % self.size, "examples_seen": seen}

    def indices(self, step: int, shard: int) -> list[int]:
        start = step * self.batch_size + shard * self.shard_size
        out = []
        for pos in range(start, start + self.shard_size):
            epoch, i = divmod(pos, self.size)
            out.append(self.permutation(epoch)[i])
        return out


class ShardSampler(Sampler[list[int]]):
    """A DataLoader batch sampler: the micro-batches of process `rank` for steps [start, stop)."""

    def __init__(self, schedule: ShardSchedule, rank: int, start: int, stop: int):
        self.schedule, self.rank, self.start, self.stop = schedule, rank, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.schedule.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        s = self.schedule
        for step in range(self.start, self.stop):
            for k in range(s.accumulate):
                yield s.indices(step, k * s.world_size + self.rank)


class CheckedDataset(Dataset):
    """Checks every item before it reaches the model: with on_bad_image = "raise" an unreadable
    or non-finite item stops the run naming its index; with "skip" the next good item (in
    index order, so runs stay repeatable) takes its place and a warning names the bad one."""

    def __init__(self, dataset: Dataset, on_bad_image: str = "raise"):
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.dataset, self.on_bad_image = dataset, on_bad_image
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        n = len(self.dataset)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                item = self.dataset[i]
                check_item(item)
                return item
            except Exception as err:  # a corrupt file can raise anything
                if self.on_bad_image == "raise":
                    raise ValueError(
                        f'data item {i} is bad ({err}); set train.on_bad_image = "skip" to skip bad items'
                    ) from err
                if i not in self._warned:
                    self._warned.add(i)
                    warnings.warn(f"skipping bad data item {i}: {err}", stacklevel=2)
        raise ValueError(f"all {n} data items are bad; nothing to train on")


def check_item(item) -> None:
    if not isinstance(item, dict) or "x" not in item:
        raise ValueError(f'a data item must be a dict with an "x" tensor, got {type(item).__name__}')
    x = item["x"]
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f'item["x"] must be a floating-point tensor, got {getattr(x, "dtype", type(x).__name__)}')
    if not torch.isfinite(x).all():
        raise ValueError('item["x"] contains NaN or inf')


def build_dataset(data: dict, on_bad_image: str = "raise") -> CheckedDataset:
    """The [data] section -> a checked data set: `name` and `split` (default "train") go to
    `difflab.data.get_dataset`, every other key is passed on as an option."""
    from difflab.data import get_dataset

    options = dict(data)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f'[data] needs name = "<data set>" (e.g. "digits"), got {name!r}')
    split = options.pop("split", "train")
    return CheckedDataset(get_dataset(name, split, **options), on_bad_image)
