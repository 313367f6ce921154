"""Context parallelism (`autopar.manual_plan(..., cp=N)`): each sample's sequence split over the
"cp" axis. A Llama-style decoder (RoPE, grouped-query attention, causal mask) at a sequence of
512, trained on 4 gloo ranks under dp=2 x cp=2 and cp=2 x tp=2 (with ZeRO-2: parameter state
sharded over cp), and a BERT under dp=2 x cp=2:
the loss after every step equals single-process training within 1e-5 relative.

On cp, the intra-op solver picks how attention runs, by price. The Llama's queries stay split
along the sequence and the keys and values are gathered (Llama 3's way), its causal rows
balanced: each rank computes one half-chunk from each end of the sequence, so every attention
call on every rank takes 1/(2 cp) of the queries, twice a layer. BERT's bidirectional attention
has no causal rows to balance, and there the tokens move to a split of the heads by all-to-all
(DeepSpeed-Ulysses' way)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import autopar
from autopar.errors import MeshError
from autopar.models import registry
from tests.helpers.distributed import run_on_ranks
from tests.helpers.models import fast_cpu_cluster, sgd_losses

SEQ = 512
STEPS = 3
LLAMA, LLAMA_TEST = registry.entry("llama-test")
BERT, BERT_TEST = registry.entry("bert-test")
MODELS = {  # name: (family, config)
    # 4 query heads, 2 key/value heads, causal
    "llama": (LLAMA, dataclasses.replace(LLAMA_TEST, seq_len=SEQ)),
    # bidirectional: no causal rows to balance
    "bert": (BERT, dataclasses.replace(BERT_TEST, seq_len=SEQ, max_positions=SEQ)),
}
# with ZeRO-2, parameter state is sharded over dp x cp (here cp alone), as Megatron-Core's
# distributed optimizer shards it
MESHES = {"dp2xcp2": dict(dp=2, cp=2, tp=1), "cp2xtp2-zero2": dict(dp=1, cp=2, tp=2, zero=2)}
CASES = {  # name: (model, mesh, attention's queries split along the sequence)
    "llama-dp2xcp2": ("llama", "dp2xcp2", True),
    "llama-cp2xtp2-zero2": ("llama", "cp2xtp2-zero2", True),  # tp splits the heads, cp the queries
    "bert-dp2xcp2": ("bert", "dp2xcp2", False),  # cp splits the heads (Ulysses)
}


def _batches(model: str, batch: int):
    family, cfg = MODELS[model]
    torch.manual_seed(1)
    return [family.batch(cfg, batch) for _ in range(STEPS)]


def _model(model: str):
    family, cfg = MODELS[model]
    torch.manual_seed(0)
    return family.model(cfg)


def _plan(case: str) -> autopar.Plan:
    model, mesh, _ = CASES[case]
    batch = MESHES[mesh]["dp"]
    with torch.device("meta"):
        meta = MODELS[model][0].model(MODELS[model][1])
    return autopar.manual_plan(meta, fast_cpu_cluster(4), _batches(model, batch)[0],
                               loss_fn=MODELS[model][0].loss, pp=1, microbatch_size=1,
                               **MESHES[mesh])


def _reference(model: str, batch: int) -> list[float]:
    net, loss_fn = _model(model), MODELS[model][0].loss

    def step(x, y):
        loss = loss_fn(net(*x) if isinstance(x, tuple) else net(x), y)
        loss.backward()
        return loss.item()

    return sgd_losses(net.parameters(), step, _batches(model, batch))


def _train(model: str, batch: int, plan_json: str):
    """On every rank: the losses of the steps, and the local query shape of every attention
    call in the last step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    queries = []
    attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
                 torch.ops.aten._scaled_dot_product_attention_math.default,
                 torch.ops.aten.scaled_dot_product_attention.default}

    class _Queries(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in attention:
                queries.append(tuple(getattr(args[0], "_local_tensor", args[0]).shape))
            return func(*args, **(kwargs or {}))

    net = _model(model)
    data = _batches(model, batch)
    plan = autopar.Plan.from_dict(json.loads(plan_json))
    pm = autopar.autoparallelize(net, fast_cpu_cluster(4), data[0],
                                 loss_fn=MODELS[model][0].loss, plan=plan)
    losses = sgd_losses(pm.parameters(), pm.train_step, data[:-1])

    def last_step(x, y):
        with _Queries():
            return pm.train_step(x, y)

    return losses + sgd_losses(pm.parameters(), last_step, data[-1:]), queries


def test_inputs_split_along_the_sequence_and_attention_chooses():
    for case, (model, mesh, split_queries) in CASES.items():
        plan = _plan(case)
        cp = list(plan.mesh).index("cp")
        assert all(v[cp] == "S(1)" for v in plan.inputs.values()), (case, plan.inputs)
        sharded = MESHES[mesh].get("zero", 0) > 0  # state over cp; the ops gather it
        assert all(v[cp].startswith("S(") if sharded else v[cp] == "R"
                   for v in plan.parameters.values()), (case, plan.parameters)
        sdpa = [op for name, op in plan.ops.items()
                if name.startswith("scaled_dot_product_attention")]
        assert len(sdpa) == MODELS[model][1].n_layer
        for op in sdpa:
            q, k, v = (pl[cp] for pl in op.inputs)
            want = ("S(2)", "R", "R") if split_queries else ("S(1)",) * 3  # Ulysses: heads
            assert (q, k, v) == want, (case, op)


def test_cp_must_divide_the_sequence_and_needs_one():
    with torch.device("meta"):
        model = _model("llama")
    with pytest.raises(MeshError, match="cp=3 does not divide the sequence of 512 tokens"):
        autopar.manual_plan(model, fast_cpu_cluster(3), _batches("llama", 1)[0],
                            loss_fn=LLAMA.loss, pp=1, dp=1, tp=1, cp=3, microbatch_size=1)
    with torch.device("meta"):
        vit, example, loss_fn = registry.build_model("vit-test", batch=2, seq=None)
    with pytest.raises(MeshError, match="cp=2: context parallelism splits a sequence of tokens"):
        autopar.manual_plan(vit, fast_cpu_cluster(2), example, loss_fn=loss_fn, pp=1, dp=1,
                            tp=1, cp=2, microbatch_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_trains_as_one_process(case):
    model, mesh, split_queries = CASES[case]
    cfg, sizes = MODELS[model][1], MESHES[mesh]
    batch = sizes["dp"]
    want = _reference(model, batch)
    for losses, queries in run_on_ranks(_train, 4, model, batch, _plan(case).to_json()):
        assert losses == pytest.approx(want, rel=1e-5)
        assert queries, "no attention call was seen"
        for shape in queries:  # (local batch, local heads, local queries, head dim)
            if split_queries:  # causal rows balanced: two half-chunks of 1/(2 cp) each
                assert shape[2] == SEQ // (2 * sizes["cp"]), shape
            else:
                assert shape[2] == SEQ and shape[1] == cfg.n_head // (sizes["cp"] * sizes["tp"])


def _causal_reference(seq: int = 64):
    """Queries, keys and values (B=2, H=3, seq, D=8; keys with one head, as grouped-query
    attention passes them), the causal attention's output, and the gradients of a weighted
    sum of it: what each split form must reproduce."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, h, seq, 8, dtype=torch.float64, requires_grad=True)
               for h in (3, 1, 1))
    weights = torch.randn(2, 3, seq, 8, dtype=torch.float64)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True)
    (out * weights).sum().backward()
    return q, k, v, weights, out


def test_query_rows_masks_by_where_the_rows_sit():
    """Queries cut into chunks (as on two axes at once), each run with all the keys: together
    the rows of the causal attention, not of each chunk's own top-left triangle."""
    from autopar.runtime.attention import query_rows

    q, k, v, _, want = _causal_reference()
    rows = [query_rows(start)(q[:, :, start:start + 16].detach(), k.detach(), v.detach(),
                              is_causal=True, enable_gqa=True)
            for start in range(0, 64, 16)]
    torch.testing.assert_close(torch.cat(rows, dim=2), want)


def _balanced_on_rank():
    """One of 4 ranks: its contiguous quarter of the queries through `balanced_rows`; returns
    its output rows and its share of the gradients."""
    import torch.distributed as dist

    from autopar.runtime.attention import balanced_rows

    rank = dist.get_rank()
    q, k, v, weights, _ = _causal_reference()
    rows = slice(16 * rank, 16 * (rank + 1))
    mine = q.detach()[:, :, rows].requires_grad_()
    kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
    out = balanced_rows(dist.group.WORLD, rank, 4)(mine, kk, vv, is_causal=True,
                                                     enable_gqa=True)
    (out * weights[:, :, rows]).sum().backward()
    # as arrays: tensors would go back through shared memory this process takes with it
    return [t.detach().numpy().copy()
            for t in (out, mine.grad, kk.grad, vv.grad, q.grad[:, :, rows], k.grad, v.grad)]


def test_balanced_causal_rows_equal_causal_attention():
    """Over 4 ranks each rank's rows, and the gradients (queries' on their rank, keys' and
    values' summed over ranks), equal one causal attention's: the half-chunks travel to the
    right ranks and back."""
    q, k, v, _, want = _causal_reference()
    ranks = [[torch.from_numpy(a) for a in r] for r in run_on_ranks(_balanced_on_rank, 4)]
    torch.testing.assert_close(torch.cat([r[0] for r in ranks], dim=2), want)
    for _out, dq, _dk, _dv, want_dq, _want_dk, _want_dv in ranks:
        torch.testing.assert_close(dq, want_dq)
    torch.testing.assert_close(sum(r[2] for r in ranks), ranks[0][5])
    torch.testing.assert_close(sum(r[3] for r in ranks), ranks[0][6])
