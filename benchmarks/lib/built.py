"""What building a system gives: its training step and which part of the global batch each
rank feeds it (`Built`), and the step with gradient accumulation that eager, compiled and the
FSDP2 baselines share (`accumulating_step`).

A builder (`build_autopar`, `build_eager`, `build_compiled`, `build_fsdp2`, `build_tp`,
`build_pp`) takes (ctx, spec, system) and returns a `Built` whose step(x, y) runs one training step on this
rank's part of the global batch (x, y) and returns the loss tensor (or None on ranks that hold
no loss).
"""

from __future__ import annotations

import torch

from benchmarks.lib.optim import optimizer_step


class Built:
    def __init__(self, step, *, dp_rank: int, dp: int, info: dict | None = None, keep=()):
        self.step, self.dp_rank, self.dp = step, dp_rank, dp
        self.info = info or {}
        self.keep = list(keep)  # modules/optimizers to drop after the run

    def slice_batch(self, x, y):
        n = x.shape[0] // self.dp
        lo = self.dp_rank * n
        return x[lo : lo + n].contiguous(), y[lo : lo + n].contiguous()


def accumulating_step(fwd_bwd, opt, microbatches: int):
    """One optimizer step over the batch in `microbatches` pieces (gradient accumulation;
    FSDP2 reduce-scatters after each, its default); returns the mean loss."""

    def step(x, y):
        if microbatches == 1:
            loss = fwd_bwd(x, y, 1.0)
        else:
            loss = torch.stack(
                [
                    fwd_bwd(a, b, 1.0 / microbatches)
                    for a, b in zip(x.chunk(microbatches), y.chunk(microbatches))
                ]
            ).mean()
        optimizer_step(opt)
        opt.zero_grad()
        return loss

    return step
