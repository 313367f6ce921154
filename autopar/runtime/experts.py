"""A grouped matmul whose experts are split over ranks (expert parallelism, dropless routing).

The rows arrive whole (every routed row of the group, sorted by expert) with `offs`, the
cumulative row count of every expert; each rank holds the weights of experts `first`,
`first + 1`, ... only. It computes those experts' rows and leaves the others zero, so the sum
over ranks is the whole output (`planning.op_rules._grouped_mm`, `planning.expert_rows`).
Where its rows start depends on the routing, so the rows are rotated to put them first, at a
static shape: the grouped matmul then reads only them (its kernel skips rows past the last
offset) and the rest is masked to zero.
"""

from __future__ import annotations

import torch


def own_rows(op, first: int):
    """`op` (a grouped matmul: input (S, K), weight (E, K, N), offs (E,)) for a rank holding
    the weights of experts `first` ... `first + weight.size(0) - 1` of them all."""

    def run(x, weight, offs):
        count, rows = weight.size(0), x.size(0)
        bounds = torch.cat([offs.new_zeros(1), offs])  # expert e's rows: bounds[e]:bounds[e+1]
        start = bounds[first]
        ends = bounds[first + 1:first + count + 1] - start
        order = torch.arange(rows, device=x.device)
        out = op(x[(order + start) % rows], weight, ends)
        out = torch.where((order < ends[-1])[:, None], out, 0)
        return out[(order - start) % rows]  # back in the input's row order

    return run
