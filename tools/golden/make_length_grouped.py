#!/usr/bin/env python3
"""Golden orders of transformers' length-grouped sampling (`group_by_length`).

`transformers.trainer_pt_utils.get_length_grouped_indices` (the Trainer's
`LengthGroupedSampler`) permutes the examples at random, cuts the permutation into mega-batches
of `mega_batch_mult * batch_size`, sorts each by length (longest first, ties in permutation
order) and moves the longest example to the front. Its random part is `torch.randperm`; here
`torch.randperm` returns a given permutation, so petal's grouping of the same permutation can
be compared with transformers' own, case by case (ties, a short last mega-batch, the longest in
a later mega-batch, mega_batch_mult from its default rule and given).

    target/venv-ref/bin/python tools/golden/make_length_grouped.py

Writes tests/fixtures/golden/length_grouped.json: [{lengths, batch_size, mega_batch_mult,
permutation, grouped}]. Versions: tools/golden/requirements.txt (transformers 5.24.0).
"""
import json
import pathlib
import random

import torch
import transformers
from transformers.trainer_pt_utils import get_length_grouped_indices

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/golden"


def main():
    rng = random.Random(0)
    cases = []
    for n, bs, mult, spread in [(10, 2, None, 5), (37, 3, None, 30), (200, 4, None, 250), (230, 4, None, 8),
                                (64, 8, 2, 100), (5, 4, None, 3), (1000, 4, None, 400)]:
        lengths = [rng.randint(1, spread) for _ in range(n)]
        perm = list(range(n))
        rng.shuffle(perm)
        real = torch.randperm
        torch.randperm = lambda k, generator=None, _p=perm: torch.tensor(_p)
        try:
            grouped = get_length_grouped_indices(lengths, bs, mega_batch_mult=mult)
        finally:
            torch.randperm = real
        assert sorted(grouped) == list(range(n))
        cases.append(dict(lengths=lengths, batch_size=bs, mega_batch_mult=mult, permutation=perm,
                          grouped=[int(i) for i in grouped]))
    out = dict(transformers=transformers.__version__, cases=cases)
    (GOLDEN / "length_grouped.json").write_text(json.dumps(out) + "\n")
    print(f"{len(cases)} cases")


if __name__ == "__main__":
    main()
