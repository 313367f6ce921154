"""Per-op costs of a traced training graph: FLOPs, bytes moved, output and saved-activation sizes.

`profile_graph(gm)` runs the graph once with an `fx.Interpreter` on meta tensors built from each
node's `meta["val"]` (nothing real is allocated), and stores an `OpProfile` on every placeholder
and `call_function` node under `node.meta[PROFILE_KEY]`:

- FLOPs come from `torch.utils.flop_counter.FlopCounterMode`: forward around the op, backward
  around `torch.autograd.grad` of the op alone, with the same inputs requiring grad as in training
  (a placeholder requires grad when its traced value did: parameters, not buffers or the batch).
- Saved activations are observed, not modelled: the op runs inside
  `torch.autograd.graph.saved_tensors_hooks`, whose `pack` sees every tensor autograd keeps for
  backward. Each saved tensor is charged to the node whose output owns its storage (a view of a
  parameter counts at the parameter's placeholder; a temporary no node returns, such as attention's
  log-sum-exp, counts at the node that made it), and each storage is counted once, in full.

Scaled-dot-product attention runs as the fused kernel `_scaled_dot_product_flash_attention_for_cpu`
on both meta and CPU tensors. On meta, plain SDPA would take the math path and save the (B, H, T, T)
attention matrix; GPUs run a fused kernel, which saves q, k, v, the output and an fp32
log-sum-exp (B, H, T), exactly what the fused CPU kernel saves, plus two int64 RNG scalars we
leave out (seen on an H200, torch 2.11: cuDNN attention in bf16, memory-efficient in fp32).

Attention's FLOPs are model FLOPs, as torch's flop counter, Megatron-LM (Narayanan et al. 2021,
sec. 5.1) and PaLM (Chowdhery et al. 2022, app. B) count them: both score matmuls in full, causal
masking not discounted, so MFU and TFLOP/s figures stay comparable with theirs. The kernel does
less (flash and cuDNN attention skip the masked blocks of a causal mask) and runs at an efficiency
that depends on its shape, so each attention node's `OpProfile.attention` keeps that shape
(`Attention`), and the cost model prices the kernel's work from it
(`autopar.planning.cost.attention_time_s`).

The same code runs on real CPU tensors (`profile_graph(gm, args=...)`), which is how the tests
check that the meta numbers are the ones a real run gives.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from autopar.planning.flop_formulas import flop_formulas
from autopar.planning.training_precision import (  # noqa: F401  (their old home)
    COMPUTE_DTYPES,
    PRECISION_NAMES,
    TrainingPrecision,
    parameter_state_bytes,
)

PROFILE_KEY = "autopar_profile"  # node.meta[PROFILE_KEY] -> OpProfile

aten = torch.ops.aten


@dataclass(frozen=True, kw_only=True)
class SavedTensor:
    """One tensor autograd saved for backward while a node ran."""

    owner: str  # node whose output owns the storage (the saving node itself for temporaries)
    shape: tuple[int, ...]
    dtype: str
    storage_bytes: float  # nbytes of the whole storage (a saved view keeps all of it alive)


@dataclass(frozen=True, kw_only=True)
class OpProfile:
    """Costs of one graph node (placeholders: a parameter, buffer or input; all FLOPs 0)."""

    fwd_flops: float  # FlopCounterMode's count of the op (0 for views and elementwise ops)
    bwd_flops: float  # FlopCounterMode's count of the op's backward, measured on the op alone
    fwd_bytes: float  # bytes read + written: input tensors + output tensors (0 for views)
    bwd_bytes: float  # assumed 2 x fwd_bytes (_BWD_BYTES_PER_FWD_BYTE); views: 0 or their
    # backward's new tensor (_VIEW_BACKWARD_BYTES)
    output_bytes: float  # bytes of the output tensor(s); 0 for views and getitem (they alias)
    saved_bytes: float  # bytes of saved-for-backward storages this node's output owns
    is_view: bool  # the output aliases an input (view ops, and getitem of a multi-output op)
    saves: tuple[SavedTensor, ...] = field(default=())  # what autograd saved while this ran
    attention: Attention | None = None  # scaled-dot-product attention's shape, else None


@dataclass(frozen=True, kw_only=True)
class Attention:
    """The shape of one scaled-dot-product attention call: what its kernel's time depends on.

    `batch_heads` is the product of the query's leading dims (batch x query heads); key and
    value heads do not change the work (grouped-query attention reads fewer, computes as many).
    """

    batch_heads: int
    seq_q: int
    seq_k: int
    head_dim: int  # of query and key
    head_dim_v: int
    causal: bool
    dropout_p: float
    masked: bool  # an attn_mask was given

    @property
    def fwd_flops(self) -> float:
        """Model FLOPs forward: q @ k^T and p @ v, 2 per multiply-add, nothing masked off
        (torch.utils.flop_counter.sdpa_flop_count)."""
        return 2.0 * self.batch_heads * self.seq_q * self.seq_k * (self.head_dim + self.head_dim_v)

    @property
    def bwd_flops(self) -> float:
        """Model FLOPs backward: the scores recomputed, dP = dO v^T, dV = P^T dO, dQ = dS k,
        dK = dS^T q (torch.utils.flop_counter.sdpa_backward_flop_count)."""
        return (2.0 * self.batch_heads * self.seq_q * self.seq_k
                * (3 * self.head_dim + 2 * self.head_dim_v))


def attention_of(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 **_ignored) -> Attention:
    """`Attention` of an SDPA call from its arguments (tensors or anything with .shape)."""
    *lead, s_q, d = query.shape
    return Attention(batch_heads=int(torch.Size(lead).numel()), seq_q=int(s_q),
                     seq_k=int(key.shape[-2]), head_dim=int(d), head_dim_v=int(value.shape[-1]),
                     causal=bool(is_causal), dropout_p=float(dropout_p),
                     masked=attn_mask is not None)


# Backward traffic per forward byte. Backward of y = f(x) reads dy and what forward saved and
# writes dx (and dW): about twice the forward's reads + writes for matmuls (two GEMMs, one per
# input) and 1.5-2x for elementwise ops. We take 2x; it is an assumption, not a measurement.
_BWD_BYTES_PER_FWD_BYTE = 2.0

# Views move no bytes forward, and most of them none backward (the gradient of a view is a
# view of the gradient). These do: their backward makes a new tensor of the input's size.
# bytes(input, output) -> backward bytes read + written.
_VIEW_BACKWARD_BYTES = {
    # cat of the outputs' gradients: read them (the input's size), write the input's gradient
    aten.split_with_sizes.default: lambda i, o: 2 * i,
    aten.split.Tensor: lambda i, o: 2 * i,
    aten.unbind.int: lambda i, o: 2 * i,
    aten.chunk.default: lambda i, o: 2 * i,
    # zeros of the input's size, the output's gradient copied into its part
    aten.slice.Tensor: lambda i, o: i + 2 * o,
    aten.select.int: lambda i, o: i + 2 * o,
    # sum of the output's gradient over the expanded dims
    aten.expand.default: lambda i, o: o + i,
}

# When an op's backward cannot be run on meta tensors we fall back to the usual rule of thumb
# (Kaplan et al. 2020, "Scaling Laws", sec. 2.1): a matmul's backward is two matmuls of the same
# size (2 x forward); any other op's backward is taken to cost its forward.
_MATMUL_LIKE = {
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.baddbmm.default,
    aten.convolution.default,
    aten.scaled_dot_product_attention.default,
}


def profile_graph(
    gm: fx.GraphModule,
    *,
    args: Sequence[object] | None = None,
    no_grad: Collection[str] = (),
) -> dict[str, OpProfile]:
    """Profile every placeholder and call_function node of `gm`; also store on node.meta.

    Parameters
    ----------
    gm : an exported ATen graph whose nodes carry `meta["val"]`.
    args : placeholder values in graph order. Default: meta tensors shaped like `meta["val"]`
        (allocates nothing). Real CPU tensors run the same code, to check the meta result.
    no_grad : placeholder names that do not require grad, whatever the graph says. Otherwise a
        floating-point placeholder requires grad when its traced value did (`_trains`):
        parameters do, frozen ones, buffers and the batch do not, as in training.

    Returns
    -------
    dict mapping node name -> OpProfile (the output node is left out).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if args is None:
        args = [_meta_like(n.meta["val"]) for n in placeholders]
    if len(args) != len(placeholders):
        raise ValueError(
            f"profile_graph: the graph has {len(placeholders)} placeholders "
            f"but {len(args)} args were given."
        )
    leaves = [_leaf(a, _trains(n) and n.name not in no_grad) for a, n in zip(args, placeholders)]
    device = next((a.device for a in leaves if isinstance(a, torch.Tensor)), torch.device("meta"))
    interp = _ProfileInterpreter(gm, device)
    with torch.enable_grad():
        interp.run(*leaves, enable_io_processing=False)
    profiles = interp.finish()
    for n in gm.graph.nodes:
        if n.name in profiles:
            n.meta[PROFILE_KEY] = profiles[n.name]
    return profiles


def saved_bytes_by_kind(
    gm: fx.GraphModule, profiles: dict[str, OpProfile], parameters: Collection[str]
) -> dict[str, float]:
    """Split the saved bytes of a profile by who owns them.

    `parameters` names the placeholders held as model state (parameters and buffers, e.g.
    `TracedModel.parameters | TracedModel.buffers`): their saved bytes cost no extra memory,
    since the planner counts parameters separately.

    Returns {"activations": owned by ops, "parameters": ..., "inputs": other placeholders}.
    """
    out = {"activations": 0.0, "parameters": 0.0, "inputs": 0.0}
    for n in gm.graph.nodes:
        if n.name not in profiles:
            continue
        kind = "activations"
        if n.op == "placeholder":
            kind = "parameters" if n.name in parameters else "inputs"
        out[kind] += profiles[n.name].saved_bytes
    return out


class _ProfileInterpreter(fx.Interpreter):
    """Runs the graph with autograd on, timing nothing: records FLOPs, bytes and saved tensors."""

    def __init__(self, gm: fx.GraphModule, device: torch.device):
        super().__init__(gm, garbage_collect_values=False)
        self.device = device  # where ops that make tensors (arange, _to_copy, ...) put them
        self.owner: dict[StorageWeakRef, str] = {}  # storage -> node whose output made it
        self.keep: list[torch.UntypedStorage] = []  # keeps storages alive so keys stay unique
        self.partial: dict[str, dict] = {}  # node name -> OpProfile fields, saved bytes pending
        self.saved: dict[str, list[torch.Tensor]] = {}  # node name -> tensors packed while it ran

    def run_node(self, n: fx.Node):
        if n.op == "placeholder":
            out = super().run_node(n)
            self._own(n.name, out)
            size = _nbytes(out)
            self.partial[n.name] = dict(
                fwd_flops=0.0,
                bwd_flops=0.0,
                fwd_bytes=0.0,
                bwd_bytes=0.0,
                output_bytes=float(size),
                is_view=False,
            )
            self.saved[n.name] = []
            return out
        if n.op != "call_function":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if "device" in kwargs:  # the graph remembers the tracing device; run on ours
            kwargs = {**kwargs, "device": self.device}
        fn = _runnable(n.target)
        is_view = n.target is operator.getitem or bool(getattr(n.target, "is_view", False))
        fwd_flops, bwd_flops = (0.0, 0.0) if is_view else _op_flops(n, fn, args, kwargs)
        packed: list[torch.Tensor] = []

        def pack(t):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*args, **kwargs)
        self._own(n.name, out)
        moved = 0.0 if is_view else float(_nbytes((args, kwargs)) + _nbytes(out))
        bwd_moved = _BWD_BYTES_PER_FWD_BYTE * moved
        if n.target in _VIEW_BACKWARD_BYTES and args and isinstance(args[0], torch.Tensor):
            bwd_moved = float(_VIEW_BACKWARD_BYTES[n.target](_nbytes(args[0]), _nbytes(out)))
        self.partial[n.name] = dict(
            fwd_flops=fwd_flops,
            bwd_flops=bwd_flops,
            fwd_bytes=moved,
            bwd_bytes=bwd_moved,
            output_bytes=0.0 if is_view else float(_nbytes(out)),
            is_view=is_view,
        )
        if n.target is aten.scaled_dot_product_attention.default:
            self.partial[n.name]["attention"] = attention_of(*args, **kwargs)
        self.saved[n.name] = packed
        return out

    def _own(self, name: str, value) -> None:
        """Record `name` as the owner of every storage in `value` no earlier node owns."""
        for t in _tensors(value):
            storage = t.untyped_storage()
            key = StorageWeakRef(storage)
            if key not in self.owner:
                self.owner[key] = name
                self.keep.append(storage)

    def finish(self) -> dict[str, OpProfile]:
        """Charge each saved storage, once, to its owner (temporaries to the node that saved it)."""
        saved_bytes = dict.fromkeys(self.partial, 0.0)
        counted: set[StorageWeakRef] = set()
        saves: dict[str, list[SavedTensor]] = {name: [] for name in self.partial}
        for name, packed in self.saved.items():
            for t in packed:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = StorageWeakRef(storage)
                owner = self.owner.get(key, name)
                size = float(storage.nbytes())
                saves[name].append(
                    SavedTensor(
                        owner=owner, shape=tuple(t.shape), dtype=str(t.dtype), storage_bytes=size
                    )
                )
                if key not in counted:
                    counted.add(key)
                    self.keep.append(storage)
                    saved_bytes[owner] += size
        return {
            name: OpProfile(**fields, saved_bytes=saved_bytes[name], saves=tuple(saves[name]))
            for name, fields in self.partial.items()
        }


def _op_flops(n: fx.Node, fn, args, kwargs) -> tuple[float, float]:
    """(forward, backward) FLOPs of one op, run alone on detached copies of its inputs."""
    args, kwargs = tree_map(_detach_keep_grad, (args, kwargs))
    with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
        out = fn(*args, **kwargs)
    fwd = float(counter.get_total_flops())
    inputs = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    outs = [t for t in _used_outputs(n, out) if t.requires_grad]
    if not inputs or not outs:
        return fwd, 0.0
    try:
        with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter:
            torch.autograd.grad(
                outs, inputs, grad_outputs=[torch.ones_like(o) for o in outs], allow_unused=True
            )
        return fwd, float(counter.get_total_flops())
    except (RuntimeError, NotImplementedError):
        # Backward not runnable here (e.g. no meta kernel): rule of thumb, see _MATMUL_LIKE.
        return fwd, (2.0 if n.target in _MATMUL_LIKE else 1.0) * fwd


def _used_outputs(n: fx.Node, out) -> list[torch.Tensor]:
    """The outputs the graph reads: of a multi-output op, only the indices some getitem takes."""
    if isinstance(out, (tuple, list)):
        used = {u.args[1] for u in n.users if u.target is operator.getitem}
        return [t for i, t in enumerate(out) if i in used and isinstance(t, torch.Tensor)]
    return _tensors(out)


# --- scaled-dot-product attention as the fused kernel ----------------------------------------


def _runnable(target):
    """What to call for a node's target: fused attention for SDPA, reshape for views, the target
    otherwise."""
    if target is aten.scaled_dot_product_attention.default:
        return _sdpa_fused
    if target in _VIEWS:
        return aten.reshape.default
    return target


# Views run as reshape, as the runtime runs them (`runtime/op_runner.py`): export chose view for
# a reshape from the strides it saw, which the kernel that runs need not give. Attention with a
# mask made from parameters (T5's position bias, Swin's relative bias) is one: export's
# decomposition retraces without autograd, so the mask seemed to need no grad, SDPA took the
# fused kernel, laid out (B, T, H, D), and `y.transpose(1, 2).reshape(B, T, C)` became a view.
# In training the mask requires grad, which the fused CPU kernel cannot differentiate: SDPA
# takes the math path, contiguous (B, H, T, D), and no view fits. reshape is the view wherever
# the view is valid, a copy elsewhere.
_VIEWS = {aten.view.default, aten._unsafe_view.default}


def _sdpa_fused(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    *,
    scale=None,
    enable_gqa=False,
):
    """SDPA through the fused CPU flash kernel (which has a meta kernel), so that meta and CPU
    save the same tensors as GPU flash attention: q, k, v, output and log-sum-exp."""
    if query.device.type not in ("cpu", "meta"):
        return aten.scaled_dot_product_attention.default(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        return _GroupedFlash.apply(query, key, value, attn_mask, dropout_p, is_causal, scale)
    try:
        out, _logsumexp = aten._scaled_dot_product_flash_attention_for_cpu.default(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
    except RuntimeError:  # arguments the fused kernel rejects (e.g. a mask it cannot take)
        return aten.scaled_dot_product_attention.default(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale
        )
    return out


class _GroupedFlash(torch.autograd.Function):
    """Grouped-query attention (fewer key/value heads than query heads, `enable_gqa`) as GPU
    flash kernels run it: each key/value head serves its group of query heads in the kernel, so
    k and v are saved at their own size. The CPU flash kernel has no GQA and plain SDPA on meta
    takes the math path (which saves the (B, H, T, T) scores), so here k and v are repeated
    per group around the kernel, forward and backward, and the repeats are not what is saved.
    FLOPs are those of the query heads, as on the GPU."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale):
        group = query.shape[-3] // key.shape[-3]
        out, logsumexp = aten._scaled_dot_product_flash_attention_for_cpu.default(
            query,
            key.repeat_interleave(group, dim=-3),
            value.repeat_interleave(group, dim=-3),
            dropout_p,
            is_causal,
            attn_mask=attn_mask,
            scale=scale,
        )
        ctx.save_for_backward(query, key, value, out, logsumexp)
        ctx.args = (group, attn_mask, dropout_p, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, logsumexp = ctx.saved_tensors
        group, attn_mask, dropout_p, is_causal, scale = ctx.args
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward.default(
            grad_out,
            query,
            key.repeat_interleave(group, dim=-3),
            value.repeat_interleave(group, dim=-3),
            out,
            logsumexp,
            dropout_p,
            is_causal,
            attn_mask=attn_mask,
            scale=scale,
        )

        def per_head(g):  # the gradient of a repeated head is the sum over its group
            return g.unflatten(-3, (key.shape[-3], group)).sum(-3)

        return dq, per_head(dk), per_head(dv), None, None, None, None


# --- tensors ---------------------------------------------------------------------------------


def _tensors(value) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _meta_like(val):
    if isinstance(val, torch.Tensor):
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device="meta")
    return val


def _trains(placeholder: fx.Node) -> bool:
    """Whether training computes this placeholder's gradient: as its traced value requires grad
    (export records it: a parameter does unless frozen; a buffer, a token id or an image does
    not). Giving a buffer a gradient would also make autograd save what that gradient needs:
    RoPE's `q * cos` would keep the unrotated q and k, 5-7% of a Llama or PaLM block."""
    val = placeholder.meta.get("val")
    return val.requires_grad if isinstance(val, torch.Tensor) else True


def _leaf(value, wants_grad: bool):
    """A fresh autograd leaf; floating-point ones require grad when `wants_grad`."""
    if not isinstance(value, torch.Tensor):
        return value
    leaf = value.detach()
    if wants_grad and (leaf.is_floating_point() or leaf.is_complex()):
        leaf.requires_grad_(True)
    return leaf


def _detach_keep_grad(value):
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    return value
