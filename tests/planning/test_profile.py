"""Per-op profiles: FLOPs and bytes checked by hand, saved activations on meta against real CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autopar.models.gpt import GPT, GPTConfig
from autopar.models.losses import lm_loss
from autopar.planning.profile import (
    PROFILE_KEY,
    TrainingPrecision,
    parameter_state_bytes,
    profile_graph,
    saved_bytes_by_kind,
)
from autopar.trace import trace

aten = torch.ops.aten


def _export(module: nn.Module, *args) -> torch.fx.GraphModule:
    """The planner's tracing recipe, inline: export on meta, core ATen, SDPA kept whole."""
    ep = torch.export.export(module.to("meta"), tuple(a.to("meta") for a in args), strict=False)
    table = torch.export.default_decompositions()
    del table[aten.scaled_dot_product_attention.default]
    return ep.run_decompositions(table).graph_module


def _only(gm: torch.fx.GraphModule, target) -> torch.fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.target == target]
    return node


class _MatmulViewSum(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(k, n))

    def forward(self, x):
        return (x @ self.w).view(-1).sum()


class TestFlopsAndBytes:
    M, K, N = 8, 16, 4

    def _profiles(self, x_requires_grad=True):
        # x stands for an activation (it requires grad), unless the test says it is the batch
        x = torch.randn(self.M, self.K, requires_grad=x_requires_grad)
        gm = _export(_MatmulViewSum(self.K, self.N), x)
        return gm, profile_graph(gm)

    def test_mm_flops_forward_and_backward(self):
        gm, profiles = self._profiles()
        mm = profiles[_only(gm, aten.mm.default).name]
        assert mm.fwd_flops == 2 * self.M * self.N * self.K
        assert mm.bwd_flops == 4 * self.M * self.N * self.K  # dX = dY W^T and dW = X^T dY
        assert mm.fwd_bytes == 4 * (self.M * self.K + self.K * self.N + self.M * self.N)
        assert mm.bwd_bytes == 2 * mm.fwd_bytes
        assert mm.output_bytes == 4 * self.M * self.N
        assert not mm.is_view

    def test_an_input_that_needs_no_gradient_gets_none(self):
        """Training computes no gradient for the batch (nor for buffers or frozen weights): the
        profile gives a placeholder a gradient only when its traced value required one, so the
        matmul's backward is dW alone, and autograd keeps no W for a dX nobody needs."""
        gm, profiles = self._profiles(x_requires_grad=False)
        x, w = [n.name for n in gm.graph.nodes if n.op == "placeholder"][::-1]
        mm = profiles[_only(gm, aten.mm.default).name]
        assert mm.bwd_flops == 2 * self.M * self.N * self.K  # dW = X^T dY only
        assert {s.owner for s in mm.saves} == {x}
        forced = profile_graph(gm, no_grad={w})  # no_grad takes a parameter's gradient away
        assert forced[_only(gm, aten.mm.default).name].bwd_flops == 0

    def test_view_moves_nothing(self):
        gm, profiles = self._profiles()
        view = profiles[_only(gm, aten.view.default).name]
        assert view.is_view
        assert (view.fwd_flops, view.bwd_flops, view.fwd_bytes, view.output_bytes) == (0, 0, 0, 0)
        assert view.saved_bytes == 0

    def test_views_whose_backward_makes_a_new_tensor_are_charged_its_bytes(self):
        """A view moves nothing forward. The gradient of most views is a view of the
        gradient, but split's is a cat of its pieces' gradients, slice's a zeroed tensor of the
        input's size with the gradient copied in, expand's a sum (GPT's qkv split and Llama's
        RoPE halves and repeated kv heads: one H200 ran 6.4 ms of cat a step for GPT 6.7B)."""

        class Views(nn.Module):
            def forward(self, x):
                a, b = x.split([8, 8], dim=1)  # (4, 8) each
                c = x[:, :4]  # (4, 4)
                d = x[:1].expand(3, 16)  # (3, 16) from (1, 16)
                return a.sum() + b.sum() + c.sum() + d.sum() + x.view(-1).sum()

        gm = _export(Views(), torch.randn(4, 16, requires_grad=True))
        profiles = profile_graph(gm)
        x = 4 * 4 * 16  # bytes of the input
        split = profiles[_only(gm, aten.split_with_sizes.default).name]
        assert (split.fwd_bytes, split.bwd_bytes) == (0, 2 * x)
        slices = [profiles[n.name] for n in gm.graph.nodes if n.target == aten.slice.Tensor]
        # x[:, :4] and x[:1]: a zeroed input-sized gradient, and the piece's written and read
        assert sorted(p.bwd_bytes for p in slices) == sorted([x + 2 * 4 * 4 * 4,
                                                             x + 2 * 4 * 1 * 16])
        assert all(p.fwd_bytes == 0 for p in slices)
        expand = profiles[_only(gm, aten.expand.default).name]
        assert expand.bwd_bytes == 4 * 3 * 16 + 4 * 1 * 16
        view = profiles[_only(gm, aten.view.default).name]
        assert view.bwd_bytes == 0

    def test_mm_saves_its_inputs_at_their_placeholders(self):
        gm, profiles = self._profiles()
        x, w = [n.name for n in gm.graph.nodes if n.op == "placeholder"][::-1]
        mm = profiles[_only(gm, aten.mm.default).name]
        assert {s.owner for s in mm.saves} == {x, w}
        assert mm.saved_bytes == 0  # mm's output is not needed by sum's backward
        assert profiles[x].saved_bytes == 4 * self.M * self.K
        assert profiles[w].saved_bytes == 4 * self.K * self.N

    def test_stored_on_node_meta(self):
        gm, profiles = self._profiles()
        for n in gm.graph.nodes:
            if n.op != "output":
                assert n.meta[PROFILE_KEY] is profiles[n.name]


class TestLayerNorm:
    def test_saves_input_weight_bias_mean_rstd(self):
        B, T, C = 2, 3, 8
        gm = _export(nn.LayerNorm(C), torch.randn(B, T, C))
        profiles = profile_graph(gm)
        ln = _only(gm, aten.native_layer_norm.default)
        weight, bias, x = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        saves = sorted((s.owner, s.shape) for s in profiles[ln.name].saves)
        assert saves == sorted(
            [
                (x, (B, T, C)),
                (weight, (C,)),
                (bias, (C,)),
                (ln.name, (B, T, 1)),
                (ln.name, (B, T, 1)),  # mean, rstd
            ]
        )
        assert profiles[ln.name].saved_bytes == 2 * 4 * B * T  # mean + rstd; the output is not
        assert profiles[x].saved_bytes == 4 * B * T * C
        assert profiles[ln.name].output_bytes == 4 * (B * T * C + 2 * B * T)


CFG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)
BATCH = 2


def _traced_gpt():
    torch.manual_seed(0)
    model = GPT(CFG)
    idx = torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len))
    target = torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len))
    traced = trace(model, (idx,), loss_fn=lm_loss, target=target)
    return model, traced, idx, target


def _real_args(model, traced, idx, target):
    """Real CPU tensors for the placeholders. Each parameter is cloned: the traced graph has
    one placeholder per name (tied weights included), each its own storage, as on meta."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers())
    names = {**traced.parameters, **traced.buffers}
    user = dict(zip(traced.inputs, (idx, target)))
    gm = traced.graph_module
    # a placeholder nothing reads (the unused name of a tied weight) gets a stand-in
    unused = {
        n.name: torch.zeros(n.meta["val"].shape)
        for n in gm.graph.nodes
        if n.op == "placeholder" and not n.users
    }
    return [
        state[names[n.name]].detach().clone() if n.name in names else {**unused, **user}[n.name]
        for n in gm.graph.nodes
        if n.op == "placeholder"
    ]


class TestGPT:
    def test_meta_profile_equals_real_cpu_profile(self):
        model, traced, idx, target = _traced_gpt()
        gm = traced.graph_module
        meta = profile_graph(gm)
        real = profile_graph(gm, args=_real_args(model, traced, idx, target))
        assert meta == real  # every field of every node, saved tensors included
        kinds = saved_bytes_by_kind(gm, meta, set(traced.parameters) | set(traced.buffers))
        assert kinds["activations"] > 0 and kinds["parameters"] > 0
        assert sum(kinds.values()) == sum(p.saved_bytes for p in meta.values())

    def test_forward_flops_equal_flop_counter_on_the_whole_model(self):
        _, traced, idx, target = _traced_gpt()
        profiles = profile_graph(traced.graph_module)
        with torch.device("meta"):
            model = GPT(CFG)
        with FlopCounterMode(display=False) as counter:
            lm_loss(model(idx.to("meta")), target.to("meta"))
        assert sum(p.fwd_flops for p in profiles.values()) == counter.get_total_flops()

    def test_backward_flops_equal_whole_model_backward_but_attention(self):
        # Whole-model backward on meta runs SDPA's math path: 4 matmuls, 8 B H T^2 D FLOPs;
        # per-op we count the fused kernel: 5 matmuls (scores recomputed), 10 B H T^2 D.
        _, traced, idx, target = _traced_gpt()
        gm = traced.graph_module
        profiles = profile_graph(gm)
        with torch.device("meta"):
            model = GPT(CFG)
        loss = lm_loss(model(idx.to("meta")), target.to("meta"))
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        sdpa = [
            n.name for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default
        ]
        d_head = CFG.d_model // CFG.n_head
        per_layer = BATCH * CFG.n_head * CFG.seq_len**2 * d_head
        assert len(sdpa) == CFG.n_layer
        assert all(profiles[s].bwd_flops == 10 * per_layer for s in sdpa)
        others = sum(p.bwd_flops for name, p in profiles.items() if name not in sdpa)
        assert others + CFG.n_layer * 8 * per_layer == counter.get_total_flops()

    def test_attention_saves_what_cpu_sdpa_saves(self):
        # Our fused stand-in must save what F.scaled_dot_product_attention saves on CPU.
        shape = (BATCH, CFG.n_head, CFG.seq_len, CFG.d_model // CFG.n_head)
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        _, traced, _, _ = _traced_gpt()
        gm = traced.graph_module
        profiles = profile_graph(gm)
        node = next(
            n for n in gm.graph.nodes if n.target == aten.scaled_dot_product_attention.default
        )
        expected = sorted(tuple(t.shape) for t in packed)
        assert sorted(s.shape for s in profiles[node.name].saves) == expected


class _GroupedQueryAttention(nn.Module):
    """SDPA with 4 query heads over 2 key/value heads (`enable_gqa`), as Hugging Face's Llama
    calls it when no mask is needed."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class TestGroupedQueryAttention:
    def test_saves_k_and_v_at_their_own_size_and_counts_query_head_flops(self):
        # As a GPU's flash kernel: q, k, v, output, log-sum-exp; not k and v repeated per
        # group, and not the math path's (B, H, T, T) scores.
        q = torch.randn(2, 4, 16, 8, requires_grad=True)
        k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(2))
        gm = _export(_GroupedQueryAttention(), q, k, v)
        node = _only(gm, aten.scaled_dot_product_attention.default)
        profile = profile_graph(gm)[node.name]
        assert sorted(s.shape for s in profile.saves) == sorted(
            [(2, 4, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8), (2, 4, 16, 8), (2, 4, 16)])
        assert profile.fwd_flops == 2 * 2 * 4 * 16 * 16 * (8 + 8)  # both matmuls, every q head

    def test_gradients_equal_torch_grouped_attention(self):
        from autopar.planning.profile import _sdpa_fused

        torch.manual_seed(0)
        q = torch.randn(2, 4, 16, 8, requires_grad=True)
        k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(2))
        got = _sdpa_fused(q, k, v, None, 0.0, True, enable_gqa=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.testing.assert_close(got, want)
        for g, w in zip(torch.autograd.grad(got.square().sum(), (q, k, v)),
                        torch.autograd.grad(want.square().sum(), (q, k, v))):
            torch.testing.assert_close(g, w)

class _AttentionWithRelativeBias(nn.Module):
    """Attention masked by a learned relative-position bias (as T5's and Swin's), then
    `transpose(1, 2).reshape(B, T, C)` as every attention block ends."""

    def __init__(self, d_model: int = 32, n_head: int = 4, seq_len: int = 8):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.table = nn.Parameter(torch.randn(2 * seq_len - 1, n_head))
        pos = torch.arange(seq_len)
        self.register_buffer("offset", pos[None, :] - pos[:, None] + seq_len - 1)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        bias = self.table[self.offset].permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return y.transpose(1, 2).reshape(b, t, c)


class TestViewsOnLayoutsTheTraceDidNotSee:
    def test_view_after_attention_with_a_learned_mask_runs_on_meta_and_cpu(self):
        # Export's decomposition retraces without autograd, so the mask seemed to need no
        # grad: SDPA took the fused kernel, laid out (B, T, H, D), and the reshape became a
        # view. In training the mask requires grad, which the fused CPU kernel cannot
        # differentiate: SDPA takes the math path, (B, H, T, D) contiguous, and no view fits.
        # The profile runs views as the runtime does (reshape), so both profiles run.
        torch.manual_seed(0)
        model = _AttentionWithRelativeBias()
        x, target = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
        traced = trace(model, (x,), loss_fn=F.mse_loss, target=target)
        gm = traced.graph_module
        sdpa = _only(gm, aten.scaled_dot_product_attention.default)
        after = next(iter(sdpa.users))
        while after.target != aten.view.default or after.meta["val"].ndim != 3:
            after = next(iter(after.users))
        # the layout export assumed: the fused kernel's, where the transpose is contiguous
        assert not sdpa.meta["val"].is_contiguous() and after.args[0].meta["val"].is_contiguous()
        meta = profile_graph(gm)
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        names = {**traced.parameters, **traced.buffers}
        user = dict(zip(traced.inputs, (x, target)))
        args = [state[names[n.name]].detach().clone() if n.name in names else user[n.name]
                for n in gm.graph.nodes if n.op == "placeholder"]
        real = profile_graph(gm, args=args)
        assert meta.keys() == real.keys()
        assert meta[after.name].is_view and meta[sdpa.name].fwd_flops > 0


class TestParameterStateBytes:
    def test_fp32_adamw_is_16_bytes_per_param(self):
        state = parameter_state_bytes(1000, TrainingPrecision.fp32())
        assert state == {"parameters": 4000.0, "gradients": 4000.0, "optimizer": 8000.0}
        assert TrainingPrecision() == TrainingPrecision.fp32()

    def test_mixed_bf16_adamw_is_zero_papers_2_2_12(self):
        state = parameter_state_bytes(1000, TrainingPrecision.mixed_bf16())
        assert state == {"parameters": 2000.0, "gradients": 2000.0, "optimizer": 12000.0}
        assert TrainingPrecision.mixed_bf16().compute_bytes == 2

    @pytest.mark.parametrize(
        "precision, per_param",
        [
            (TrainingPrecision.fp32("sgd"), 8),
            (TrainingPrecision.fp32("sgd_momentum"), 12),
            (TrainingPrecision.mixed_bf16("sgd"), 8),  # 2 + 2 + fp32 master 4
            (TrainingPrecision.mixed_bf16("sgd_momentum"), 12),
        ],
    )
    def test_sgd(self, precision, per_param):
        assert sum(parameter_state_bytes(10, precision).values()) == 10 * per_param

    def test_unknown_optimizer_says_which_exist(self):
        with pytest.raises(ValueError, match="adamw"):
            TrainingPrecision.fp32("lion")


def test_hugging_face_experts_grouped_matmuls_are_counted():
    """transformers runs Mixtral's experts as one grouped matmul per projection (its custom op
    on CPUs and fp32, torch's `_grouped_mm` on GPUs). FlopCounterMode counts neither: the
    experts, most of an MoE model's work, would be priced free. Each is 2 * rows * K * N
    forward (every routed row through its expert's matrix once) and twice that backward."""
    from autopar.models import registry

    tiny = dict(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    with torch.device("meta"):
        model, example, loss_fn = registry.build_model("hf:mixtral", batch=4, seq=16,
                                                       overrides=tiny)
    gm = trace(model, example, loss_fn=loss_fn).graph_module
    profiles = profile_graph(gm)
    grouped = [n for n in gm.graph.nodes if "grouped_mm" in str(n.target)]
    assert len(grouped) == 2  # gate-and-up, then down
    for n in grouped:
        rows, k = n.args[0].meta["val"].shape
        experts, _, out = n.args[1].meta["val"].shape
        assert experts == 8
        want = 2 * rows * k * out
        assert (profiles[n.name].fwd_flops, profiles[n.name].bwd_flops) == (want, 2 * want)
    # 64 tokens x top-2 = 128 rows: 2 x 128 x 64 x 256 (gate and up) and 2 x 128 x 128 x 64
    assert sum(profiles[n.name].fwd_flops for n in grouped) == 4194304 + 2097152
