"""The zoo's resumable loader: skips what an interrupted epoch consumed, and draws each sample's augmentation
from ``(seed, epoch, index)``, so neither a resume nor the number of workers changes a batch."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from zoo.resume import ResumableDataLoader


class NoisyItems(Dataset):
    """Items whose "augmentation" is a draw from torch's global generator, as timm's transforms draw."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), float(torch.rand(()))])


def epoch_batches(loader, epoch: int) -> list[torch.Tensor]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_resumable_loader_skips_consumed_batches_and_keeps_full_length():
    """The resumed epoch yields exactly the batches the interrupted one had left; ``len`` stays the epoch's."""
    data = list(range(48))
    reference = [b.tolist() for b in ResumableDataLoader(data, batch_size=8, shuffle=True, seed=3)]
    loader = ResumableDataLoader(data, batch_size=8, shuffle=True, seed=3)
    iterator = iter(loader)
    for _ in range(4):
        next(iterator)
    state = loader.state_dict()
    assert state == {"batches_yielded": 4, "epoch": 0}

    resumed = ResumableDataLoader(data, batch_size=8, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    rest = iter(resumed)
    assert len(resumed) == 6  # Lightning keeps this as the epoch length for every later epoch
    assert [b.tolist() for b in rest] == reference[4:]
    assert resumed.state_dict() == {"batches_yielded": 6, "epoch": 0}
    assert [b.tolist() for b in resumed] == reference  # the next iteration is a whole epoch again


def test_augmentation_is_a_function_of_seed_epoch_and_index_not_of_workers_or_resume():
    reference = epoch_batches(ResumableDataLoader(NoisyItems(), batch_size=4, shuffle=True, seed=1), 2)
    torch.manual_seed(123)  # the global generator's state does not matter
    with_workers = ResumableDataLoader(NoisyItems(), batch_size=4, shuffle=True, seed=1, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(epoch_batches(with_workers, 2), reference))

    resumed = ResumableDataLoader(NoisyItems(), batch_size=4, shuffle=True, seed=1)
    resumed.load_state_dict({"batches_yielded": 2, "epoch": 2})  # the epoch comes with the position
    assert all(torch.equal(a, b) for a, b in zip(list(resumed), reference[2:]))

    next_epoch = epoch_batches(ResumableDataLoader(NoisyItems(), batch_size=4, shuffle=True, seed=1), 3)
    assert not torch.equal(
        torch.cat(next_epoch)[:, 1].sort().values, torch.cat(reference)[:, 1].sort().values
    )


def test_loading_items_leaves_the_global_generators_untouched():
    loader = ResumableDataLoader(NoisyItems(), batch_size=4, shuffle=True, seed=1)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    list(loader)
    assert torch.equal(torch.rand(3), expected)
