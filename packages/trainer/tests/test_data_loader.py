import datasets
import pytest
import torch

from torchspec.trainer.loop.data_loader import DistributedBatchLoader, EvalBatches, collate

from trainer_test_helpers import token_dataset

PAD = 95


def loader(samples, rank=0, world_size=1, global_batch=8, micro=2, seed=0, max_seq_length=None):
    return DistributedBatchLoader(samples, global_batch, micro, PAD, rank, world_size, seed, max_seq_length)


def sample_ids(micro_batches):
    """The sample each row came from (token 0 of sample i is i)."""
    return [int(row[0]) for batch in micro_batches for row in batch.input_ids]


def test_collate_pads_to_the_longest_and_masks_padding():
    samples = token_dataset([3, 5, 2])
    batch = collate(samples, PAD)
    assert batch.input_ids.shape == (3, 5)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        assert batch.input_ids[row, :n].tolist() == sample["input_ids"]
        assert batch.input_ids[row, n:].tolist() == [PAD] * (5 - n)
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (5 - n)
        assert batch.loss_mask[row].tolist() == sample["loss_mask"] + [0] * (5 - n)
    cut = collate(samples, PAD, max_seq_length=4)
    assert cut.input_ids.shape == (3, 4) and cut.input_ids[1].tolist() == samples[1]["input_ids"][:4]


def test_epoch_is_a_seeded_permutation_without_repeats():
    samples = token_dataset([4] * 20)
    first = loader(samples)
    seen = [sample_ids(first.next_batches()) for _ in range(first.steps_per_epoch)]
    flat = [i for step in seen for i in step]
    assert first.steps_per_epoch == 2 and len(flat) == 16 and len(set(flat)) == 16  # last partial batch dropped
    assert first.epoch == 1 and first.step_in_epoch == 0
    again = loader(samples)
    assert [sample_ids(again.next_batches()) for _ in range(2)] == seen
    second_epoch = [sample_ids(first.next_batches()) for _ in range(2)]
    assert second_epoch != seen
    other_seed = loader(samples, seed=1)
    assert [sample_ids(other_seed.next_batches()) for _ in range(2)] != seen
    # The order is the documented one: torch.randperm under seed + epoch.
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(0)).tolist()[:8]
    assert seen[0] == expected


@pytest.mark.parametrize("world_size, micro", [(2, 2), (4, 1), (2, 4)])
def test_ranks_split_the_one_process_global_batch(world_size, micro):
    samples = token_dataset([3 + i % 5 for i in range(30)])
    single = loader(samples, global_batch=8, micro=2)
    ranks = [loader(samples, rank=r, world_size=world_size, global_batch=8, micro=micro) for r in range(world_size)]
    for _ in range(7):  # crosses an epoch boundary (3 steps per epoch)
        whole = sample_ids(single.next_batches())
        parts = [sample_ids(rank.next_batches()) for rank in ranks]
        assert [i for part in parts for i in part] == whole  # disjoint, and together exactly the global batch
        assert all(len(p) == 8 // world_size for p in parts)
    assert ranks[0].accumulation_steps == 8 // world_size // micro


def test_micro_batches_pad_to_their_own_longest():
    samples = token_dataset([2, 9, 3, 4])
    batches = DistributedBatchLoader(samples, 4, 2, PAD, seed=0).next_batches()
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()
    for batch, pair in zip(batches, [order[:2], order[2:]]):
        assert batch.input_ids.shape[1] == max(len(samples[i]["input_ids"]) for i in pair)


def test_resume_continues_exactly_on_any_world_size():
    samples = token_dataset([5] * 24)
    uninterrupted = loader(samples, global_batch=4, micro=2)
    expected = [sample_ids(uninterrupted.next_batches()) for _ in range(10)]

    interrupted = loader(samples, global_batch=4, micro=2)
    for _ in range(7):
        interrupted.next_batches()
    state = interrupted.state_dict()
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)

    resumed = loader(samples, global_batch=4, micro=2)
    resumed.load_state_dict(state)
    assert [sample_ids(resumed.next_batches()) for _ in range(3)] == expected[7:]

    ranks = [loader(samples, rank=r, world_size=2, global_batch=4, micro=1) for r in range(2)]
    for rank in ranks:
        rank.load_state_dict(state)
    assert [[i for r in ranks for i in sample_ids(r.next_batches())] for _ in range(3)] == expected[7:]


def test_resume_refuses_a_different_data_order():
    samples = token_dataset([5] * 24)
    state = loader(samples, global_batch=4, micro=2).state_dict()
    with pytest.raises(ValueError, match="global_batch_size=4, this run has 8"):
        loader(samples, global_batch=8, micro=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=24, this run has 20"):
        loader(samples[:20], global_batch=4, micro=2).load_state_dict(state)


def test_huggingface_dataset_gives_the_same_batches_as_a_list():
    samples = token_dataset([3 + i % 4 for i in range(12)])
    table = datasets.Dataset.from_list([{"input_ids": s["input_ids"], "loss_mask": s["loss_mask"]} for s in samples])
    from_list, from_table = loader(samples, global_batch=4), loader(table, global_batch=4)
    for _ in range(4):
        for a, b in zip(from_list.next_batches(), from_table.next_batches()):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)


def test_bad_batch_geometry():
    samples = token_dataset([3] * 10)
    with pytest.raises(ValueError, match="multiple of 4"):
        loader(samples, world_size=2, global_batch=6, micro=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loader(samples, global_batch=16, micro=2)


def test_eval_batches_cover_every_sample_once_with_equal_counts_per_rank():
    samples = token_dataset([3 + i % 3 for i in range(7)])
    ranks = [EvalBatches(samples, 2, PAD, rank=r, world_size=3) for r in range(3)]
    per_rank = [list(r) for r in ranks]
    assert len({len(batches) for batches in per_rank}) == 1
    supervised = [
        int(row[0]) for batches in per_rank for b in batches for row, m in zip(b.input_ids, b.loss_mask) if m.any()
    ]
    assert sorted(supervised) == list(range(7))
    fillers = [b for batches in per_rank for b in batches if not b.loss_mask.any()]
    assert fillers  # 7 samples over 3 ranks x 2 rows leave one rank without data in the last round
