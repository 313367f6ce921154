"""Expert parallelism for Hugging Face's Mixtral as it comes: dropless routing, its experts run
as grouped matmuls (`planning.op_rules._grouped_mm`, `planning.expert_rows`,
`runtime.experts`). The tiny model (tests/helpers/hf_models.py: default config, 4 experts,
top-2, dropout off) trained on 4 gloo ranks under dp=2 x ep=2, ep=4 and ep=2 x tp=2 (replayed)
equals single-process training after every step within 1e-5 relative, and each rank holds 1/ep
of every expert weight (tp may split them further)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import autopar
from autopar.runtime.experts import own_rows
from tests.helpers import traces
from tests.helpers.distributed import run_on_ranks
from tests.helpers.hf_models import hf_batch, hf_model
from tests.helpers.models import fast_cpu_cluster

STEPS, LR = 2, 0.1
MESHES = {"dp2xep2": dict(dp=2, ep=2, tp=1), "ep4": dict(dp=1, ep=4, tp=1),
          "ep2xtp2": dict(dp=1, ep=2, tp=2)}
# op by op, and once replayed (the default runtime, which traces each layer on fake tensors)
RUNTIMES = {"dp2xep2": "eager", "ep4": "eager", "ep2xtp2": "replay"}


def test_each_ranks_own_rows_sum_to_the_grouped_matmul():
    """`own_rows` on every split of the experts: the outputs sum to the grouped matmul of
    them all, and so do the gradients of the rows and of the weights (uneven groups, an
    expert with no rows)."""
    import transformers.integrations.moe  # noqa: F401  (registers transformers' op)

    op = torch.ops.transformers.grouped_mm_fallback.default
    gen = torch.Generator().manual_seed(0)
    rows, k, n, experts = 20, 8, 6, 4
    x = torch.randn(rows, k, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(experts, k, n, dtype=torch.float64, generator=gen, requires_grad=True)
    per_expert = torch.tensor([4, 9, 0, 7])
    offs = torch.cumsum(per_expert, 0).to(torch.int32)
    weights = torch.randn(rows, n, dtype=torch.float64, generator=gen)
    want = op(x, w, offs)
    want_grads = torch.autograd.grad((want * weights).sum(), (x, w))
    for ranks in (2, 4):
        count = experts // ranks
        got = sum(own_rows(op, r * count)(x, w[r * count:(r + 1) * count], offs)
                  for r in range(ranks))
        torch.testing.assert_close(got, want)
        for g, g_want in zip(torch.autograd.grad((got * weights).sum(), (x, w)), want_grads):
            torch.testing.assert_close(g, g_want)


@functools.cache
def _plan(mesh: str) -> str:
    with torch.device("meta"):
        model = hf_model("mixtral", dropout_off=True)
    batch = hf_batch("mixtral", seed=0)
    m = MESHES[mesh]
    return autopar.manual_plan(model, fast_cpu_cluster(4), batch, pp=1,
                               microbatch_size=len(batch["labels"]) // (m["dp"] * m["ep"]),
                               **m).to_json()


def test_experts_stay_split_and_their_rows_stay_partial_on_ep():
    """The plan: every expert weight split over ep, the others whole there; each grouped
    matmul computes its own experts' rows, and silu(gate) * up runs on them as they are
    (partial on ep), not gathered."""
    plan = autopar.Plan.from_dict(json.loads(_plan("ep4")))
    experts = {k: v for k, v in plan.parameters.items() if ".experts." in k}
    assert len(experts) == 4  # gate_up_proj and down_proj of 2 blocks
    assert all(v == ["S(0)"] for v in experts.values()), experts
    assert all(v == ["R"] for k, v in plan.parameters.items() if k not in experts)
    grouped = [name for name, op in plan.ops.items() if name.startswith("grouped_mm")]
    assert len(grouped) == 4
    for name in grouped:
        assert plan.ops[name].inputs[1] == ["S(0)"] and plan.ops[name].outputs[0] == ["P(sum)"]
    for name in ("silu", "mul_11", "silu_1"):
        assert plan.ops[name].outputs[0] == ["P(sum)"], (name, plan.ops[name])


def _sgd_losses(parameters, train_step) -> list[float]:
    opt = torch.optim.SGD(parameters, lr=LR)
    losses = []
    for step in range(STEPS):
        losses.append(float(train_step(hf_batch("mixtral", seed=step))))
        opt.step()
        opt.zero_grad()
    return losses


def _single_process_losses() -> list[float]:
    torch.manual_seed(0)
    model = hf_model("mixtral", dropout_off=True)

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        return loss.detach()

    return _sgd_losses(model.parameters(), step)


def _train_all(runs: list[tuple[str, str]]) -> list:
    """On every rank: for each (plan, runtime), the losses and each expert weight's local shape
    after."""
    results = []
    for plan_json, runtime in runs:
        torch.manual_seed(0)
        model = hf_model("mixtral", dropout_off=True)
        plan = autopar.Plan.from_dict(json.loads(plan_json))
        with traces.remembered("mixtral"):
            pm = autopar.autoparallelize(model, fast_cpu_cluster(4), hf_batch("mixtral"),
                                         plan=plan, runtime=runtime)
        losses = _sgd_losses(pm.parameters(), pm.train_step)
        results.append((losses, [tuple(p.to_local().shape) for p in pm.parameters()
                                 if p.ndim == 3]))
    return results


def _trace() -> None:
    """The launch's `prepare`: the trace every run's autoparallelize makes (the whole batch,
    no pipeline), made once before the ranks fork (tests/helpers/traces.py)."""
    torch.manual_seed(0)
    traces.remember("mixtral", hf_model("mixtral", dropout_off=True), hf_batch("mixtral"), None)


@pytest.mark.slow
def test_hf_mixtral_under_ep_trains_as_one_process():
    want = _single_process_losses()
    per_rank = run_on_ranks(_train_all, 4, [(_plan(m), RUNTIMES[m]) for m in MESHES],
                            timeout_s=900, prepare=_trace)
    experts, hidden, ffn = 4, 64, 128
    for k, mesh in enumerate(MESHES):
        ep, tp = MESHES[mesh]["ep"], MESHES[mesh]["tp"]
        for rank in per_rank:
            losses, shapes = rank[k]
            assert losses == pytest.approx(want, rel=1e-5), mesh
            assert len(shapes) == 4, mesh
            for shape in shapes:
                # 1/ep of the experts; tp splits them again or each expert's width
                assert experts // shape[0] in {ep, ep * tp}, (mesh, shape)
                assert shape[0] * shape[1] * shape[2] * ep * tp <= experts * hidden * 2 * ffn
