import torch

from hlora.client import length_grouped_batches


def test_batches_cover_each_example_once_and_grouping_cuts_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (400,), generator=g).tolist()
    indices = list(range(0, 400, 2))  # a client's share
    for window in (0, 4, 32):
        batches = length_grouped_batches(indices, lengths, 16, torch.Generator().manual_seed(1), window)
        assert sorted(i for b in batches for i in b) == indices
        assert all(1 <= len(b) <= 16 for b in batches)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = length_grouped_batches(indices, lengths, 16, torch.Generator().manual_seed(1), 0)
    grouped = length_grouped_batches(indices, lengths, 16, torch.Generator().manual_seed(1), 32)
    assert padding(grouped) < 0.2 * padding(plain)
    again = length_grouped_batches(indices, lengths, 16, torch.Generator().manual_seed(1), 32)
    assert grouped == again  # seeded
