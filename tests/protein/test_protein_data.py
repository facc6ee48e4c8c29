"""ProteinDataModule: embedded real proteins, fixed splits, cropping, token-budget batching, contact maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, SequentialSampler

from zoo.datamodules.proteins import ProteinDataModule, TokenBudgetBatchSampler, split_by_id
from zoo.protein.fasta import id_hash


def _ids(dataset) -> list[str]:
    return [dataset.index.record_id(int(i)) for i in dataset.records]


def test_embedded_splits_are_fixed_disjoint_and_complete():
    data = ProteinDataModule()
    data.setup("fit")
    sets = [_ids(s) for s in (data.train_set, data.val_set, data.test_set)]
    assert [len(s) for s in sets] == [1878, 104, 104]
    assert len(set().union(*sets)) == 2086
    again = ProteinDataModule()
    again.setup("fit")
    assert _ids(again.val_set) == sets[1]
    other = ProteinDataModule(seed=1)
    other.setup("fit")
    assert _ids(other.val_set) != sets[1]
    assert data.skipped == {"more than 50% X": 14}


def test_split_depends_on_ids_not_file_order(tmp_path):
    ids = [f"p{i}" for i in range(50)]
    hashes = np.asarray([id_hash(i.encode()) for i in ids], dtype=np.uint64)
    _, val, test = split_by_id(hashes, np.arange(50), 3, 0.2, 0.1)
    reversed_order = hashes[::-1].copy()
    _, val_r, test_r = split_by_id(reversed_order, np.arange(50), 3, 0.2, 0.1)
    assert {ids[i] for i in val} == {ids[49 - i] for i in val_r} and len(val) == 10 and len(test) == 5
    assert {ids[i] for i in test} == {ids[49 - i] for i in test_r}


def test_crops_training_sequences_and_cuts_evaluation_ones(tmp_path):
    path = tmp_path / "long.fasta"
    sequence = "".join(np.random.default_rng(0).choice(list("ACDEFGHIKLMNPQRSTVWY"), 300))
    path.write_text("".join(f">p{i}\n{sequence}\n" for i in range(10)))
    data = ProteinDataModule(
        fasta=str(path), max_length=40, batch_size=2, val_fraction=0.2, test_fraction=0.0
    )
    data.setup("fit")
    crops = {data.train_set[0]["sequence"] for _ in range(20)}
    assert len(crops) > 1 and all(len(c) == 40 and c in sequence for c in crops)
    assert data.val_set[0]["sequence"] == sequence[:40]
    batch = next(iter(data.train_dataloader()))
    assert (
        batch["tokens"].shape == (2, 42)
        and (batch["tokens"][:, 0] == 0).all()
        and (batch["tokens"][:, -1] == 2).all()
    )


def test_token_budget_batches_cover_everything_within_budget():
    lengths = np.random.default_rng(0).integers(5, 200, 500)
    sampler = TokenBudgetBatchSampler(SequentialSampler(range(500)), lengths, max_tokens=1000, shuffle=True)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) * lengths[b].max() <= 1000 for b in batches)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.1 * lengths.sum()  # length sorting keeps padding low


def test_token_budget_epochs_reshuffle_and_keep_their_length():
    lengths = np.repeat([10, 20, 30], 40)
    epochs = DistributedSampler(range(120), num_replicas=1, rank=0)
    sampler = TokenBudgetBatchSampler(epochs, lengths, max_tokens=100, shuffle=True, seed=0)
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same plan
    epochs.set_epoch(1)  # what Lightning calls every epoch
    second = list(sampler)
    assert second != first and len(second) == len(first) == len(sampler)
    ordered = TokenBudgetBatchSampler(SequentialSampler(range(120)), lengths, max_tokens=100)
    assert list(ordered) == list(ordered)


def test_token_budget_shards_evenly_across_ranks():
    lengths = np.random.default_rng(1).integers(5, 100, 301)
    shards = []
    for rank in range(3):
        distributed = DistributedSampler(range(301), num_replicas=3, rank=rank, shuffle=True, seed=0)
        distributed.set_epoch(2)
        shards.append(list(TokenBudgetBatchSampler(distributed, lengths, 400, shuffle=True)))
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    seen = [i for s in shards for b in s for i in b]
    assert set(seen) == set(range(301))


def test_budget_smaller_than_a_sequence_is_an_error():
    with pytest.raises(ValueError, match="smaller than the longest sequence"):
        TokenBudgetBatchSampler(SequentialSampler(range(2)), np.array([10, 50]), max_tokens=20)
    with pytest.raises(ValueError, match=r"max_tokens=100 must be >= max_length \+ 2"):
        ProteinDataModule(max_tokens=100, max_length=1022)


def test_datamodule_token_budget_loader():
    data = ProteinDataModule(max_tokens=2048, max_length=254)
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader.batch_sampler, TokenBudgetBatchSampler)
    for _, batch in zip(range(5), loader):
        assert batch["tokens"].numel() <= 2048 and len(batch["ids"]) == batch["tokens"].shape[0]


def test_contact_maps_follow_the_records(tmp_path):
    path = tmp_path / "seqs.fasta"
    path.write_text(">a\nMKTAYIAKQR\n>b\nMKV\n>c\nACDEF\n>d\nWWWW\n")
    maps = {"a": np.eye(10, dtype=np.int8), "b": np.ones((3, 3), dtype=bool)}
    np.savez(tmp_path / "contacts.npz", **maps)
    data = ProteinDataModule(
        fasta=str(path), contacts=str(tmp_path / "contacts.npz"), val_fraction=0.75, test_fraction=0.0
    )
    data.setup("validate")
    examples = [data.val_set[i] for i in range(len(data.val_set))]
    batch = data.collate(examples)
    width = batch["tokens"].shape[1] - 2
    assert batch["contacts"].shape == (3, width, width)
    for row, example in enumerate(examples):
        n = len(example["sequence"])
        expected = maps.get(example["id"])
        block = batch["contacts"][row]
        if expected is None:
            assert (block == -1).all()
        else:
            assert torch.equal(block[:n, :n], torch.from_numpy(expected.astype(np.int8)))
            assert (block[n:] == -1).all() and (block[:, n:] == -1).all()


def test_contact_map_of_the_wrong_shape_is_named(tmp_path):
    path = tmp_path / "seqs.fasta"
    path.write_text(">a\nMKTAY\n>b\nMKV\n")
    folder = tmp_path / "maps"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((4, 4)))
    np.save(folder / "b.npy", np.zeros((4, 4)))
    data = ProteinDataModule(fasta=str(path), contacts=str(folder), val_fraction=0.5, test_fraction=0.0)
    data.setup("validate")
    with pytest.raises(
        ValueError, match=r"maps: contact map of '[ab]' has shape \(4, 4\), expected \((5, 5|3, 3)\)"
    ):
        data.val_set[0]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ProteinDataModule(fasta="/no/such.fasta")
    with pytest.raises(FileNotFoundError, match="contact maps"):
        ProteinDataModule(contacts=str(tmp_path / "none.npz"))
    with pytest.raises(ValueError, match="on_invalid"):
        ProteinDataModule(on_invalid="ignore")
    bad = tmp_path / "bad.fasta"
    bad.write_text(">a\nMKT\n>b\nMK1\n")
    data = ProteinDataModule(fasta=str(bad), val_fraction=0.5, test_fraction=0.0)
    with pytest.raises(ValueError, match=r"bad.fasta:4: record 'b' has '1' at column 3"):
        data.setup("fit")
    skipping = ProteinDataModule(fasta=str(bad), on_invalid="skip", val_fraction=0.5, test_fraction=0.0)
    with pytest.raises(ValueError, match="too few"):
        skipping.setup("fit")  # one usable record cannot be split
    assert skipping.skipped == {"bad character": 1}


def test_predict_path_is_read_whole_and_apart_from_the_training_data(tmp_path):
    path = tmp_path / "one.fasta"
    path.write_text(">only\nMKTAYIAKQR\n")  # one record: too few to split, yet it can be predicted
    data = ProteinDataModule(predict_path=str(path), batch_size=4)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch["ids"] == ["only"] and batch["tokens"].shape == (1, 12)
    data.setup("fit")  # the training data (the embedded proteins) is untouched by it
    assert len(data.train_set) == 1878 and [r["id"] for r in data.predict_set] == ["only"]
    with pytest.raises(FileNotFoundError, match=r"missing\.fasta"):
        ProteinDataModule(predict_path=str(tmp_path / "missing.fasta"))
