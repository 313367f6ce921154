"""Sharding rules of our own, for ops DTensor cannot shard itself.

A rule is written for ONE mesh axis: it lists, per strategy, a placement for every tensor input
and output of the op. `expand_to_mesh` combines them over all axes. Ops with a rule here run on
local shards (like `torch.distributed.tensor.experimental.local_map`): each rank calls the op on
its local tensors and the result is rewrapped with the rule's output placements. So a rule must
only list placements under which the op on local shards computes the right local result.

Adding an op here: write a function `node -> list[AxisStrategy]` named after the op (as `_sdpa`
is for scaled_dot_product_attention) and add it to `RULES` under its ATen overload. Users add
theirs without editing autopar: `autopar.register_rule(op, fn)` (docs/rules.md). A registered
rule comes first, then `RULES`, then DTensor's own; `rule_strategies` checks what a rule returns.
An op with none of them runs replicated, and the planner warns (`warn_fallbacks`).
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from collections.abc import Callable

import torch
from torch import fx
from torch.distributed.tensor import Partial, Placement, Replicate, Shard

from autopar.errors import AutoparError, NoShardingRuleWarning
from autopar.trace import tensor_inputs

aten = torch.ops.aten

# (placement per tensor input, placement per output) on one mesh axis
AxisStrategy = tuple[tuple, tuple]


def _sdpa(node: fx.Node) -> list[AxisStrategy]:
    """scaled_dot_product_attention(q, k, v, attn_mask=None, ...): q/k/v are (B, H, T, D).

    Batch and heads are independent, so sharding both on dim 0 (batch) or dim 1 (heads) is exact
    on local shards; the head dim is not, nor are the keys' and values' sequence (softmax spans
    it). The queries' sequence (dim 2) may be split with keys and values whole (context
    parallelism, all-gathered keys and values): each query row needs every key, and nothing
    else; under a causal mask the runtime masks each rank's rows by where they sit in the
    sequence (`runtime.attention.query_rows`).
    A mask shards with q on a dim where it is not broadcast, else stays replicated.
    """
    q = node.args[0].meta["val"]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    has_mask = isinstance(mask, fx.Node)
    strategies = [((Replicate(),) * (3 + has_mask), (Replicate(),))]
    for dim in (0, 1, 2):
        ins = [Shard(dim)] * 3 if dim < 2 else [Shard(dim), Replicate(), Replicate()]
        if has_mask:
            m = mask.meta["val"]
            aligned = dim - (q.ndim - m.ndim)  # masks broadcast from the right
            full = aligned >= 0 and m.shape[aligned] == q.shape[dim]
            ins.append(Shard(aligned) if full else Replicate())
        strategies.append((tuple(ins), (Shard(dim),)))
    return strategies


def _grouped_mm(node: fx.Node) -> list[AxisStrategy]:
    """A grouped matmul (a mixture-of-experts layer's experts): input (S, K), its rows sorted by
    expert, times weight (E, K, N), one matrix per expert, with offs (E,) the cumulative row
    count of each expert, gives (S, N). As `aten._grouped_mm` and transformers' fallback op.

    Every rule of a matmul that splits K (a partial sum) or N holds for each group alike. The
    experts (dim 0 of the weight) may be split too, the rows whole: each rank computes the rows
    of its own experts and leaves the others zero, so the sum over ranks is the output (expert
    parallelism: `runtime.experts.own_rows`). That output is a partial sum of a special kind,
    each row nonzero on one rank only, which the row-wise ops after it may keep
    (`planning.expert_rows`); fed such a value, the next grouped matmul of the same experts
    reads only its own rows, so it takes the input partial too. The rows themselves cannot be
    split: offs counts them all.
    """
    x, w = (a.meta["val"] for a in node.args[:2])
    inputs = tensor_inputs(node)
    replicate = [((Replicate(),) * len(inputs), (Replicate(),))]
    if x.ndim != 2 or w.ndim != 3 or len(inputs) != 3:  # other layouts, a bias: whole
        return replicate
    r, p = Replicate(), Partial()
    return replicate + [
        ((Shard(1), Shard(1), r), (p,)),  # K split: partial sums
        ((r, Shard(2), r), (Shard(1),)),  # N split
        ((r, Shard(0), r), (p,)),  # experts split: each rank its experts' rows
        ((p, Shard(0), r), (p,)),  # ... fed rows of the same experts' split (expert_rows)
    ]


Rule = Callable[[fx.Node], list[AxisStrategy]]

RULES: dict[object, Rule] = {
    aten.scaled_dot_product_attention.default: _sdpa,
    aten._grouped_mm.default: _grouped_mm,
}
# ops of libraries autopar does not import, by their registered name: transformers runs its
# experts' grouped matmul as this custom op where torch's kernel does not take the inputs
# (CPUs, fp32 weights)
RULES_BY_NAME: dict[str, Rule] = {
    "transformers::grouped_mm_fallback": _grouped_mm,
}


def _op_name(op) -> str | None:
    return op.name() if isinstance(op, torch._ops.OpOverload) else None

# rules registered by `register_rule`: an OpOverload, or an OpOverloadPacket (all its overloads)
_REGISTERED: dict[object, Rule] = {}
_OPS = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)


class RegisteredRule:
    """What `register_rule` returns. `remove()` takes the rule back (restoring the rule it
    replaced, if any); used as a context manager, the rule holds inside the `with` block."""

    def __init__(self, op, fn: Rule, replaced: Rule | None):
        self.op, self.fn, self._replaced = op, fn, replaced

    def remove(self) -> None:
        if _REGISTERED.get(self.op) is not self.fn:
            return  # removed already, or replaced since: leave the newer rule
        if self._replaced is None:
            del _REGISTERED[self.op]
        else:
            _REGISTERED[self.op] = self._replaced

    def __enter__(self) -> RegisteredRule:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"RegisteredRule({self.op}, {_name(self.fn)})"


def register_rule(op, fn: Rule) -> RegisteredRule:
    """Shard `op` with `fn` from now on: `fn(node)` returns a list of one-axis strategies,
    (placement per tensor input, placement per output), as the rules in `RULES` do.

    `op` is an ATen op overload (`torch.ops.aten.foo.default`, `torch.ops.mylib.bar.default`)
    or an overload packet (`torch.ops.aten.foo`: every overload). A registered rule comes before
    autopar's own and DTensor's, and the op runs on local shards (see the module docstring).
    Registering an op again replaces its rule. Returns a handle: `.remove()`, or `with`.
    """
    if not isinstance(op, _OPS):
        raise AutoparError(
            f"register_rule(op, fn): op is {op!r} ({type(op).__name__}), not an ATen op: pass an "
            "op overload such as torch.ops.aten.cumsum.default, or an overload packet such as "
            "torch.ops.aten.cumsum for all its overloads (for a torch.library.custom_op "
            "'mylib::foo': torch.ops.mylib.foo.default)"
        )
    if not callable(fn):
        raise AutoparError(
            f"register_rule({op}, fn): fn is {fn!r}, not callable: pass a function "
            "fn(node) -> list of (input placements, output placements) tuples, one placement "
            "per tensor input and per output, on one mesh axis (docs/rules.md)"
        )
    replaced = _REGISTERED.get(op)
    _REGISTERED[op] = fn
    return RegisteredRule(op, fn, replaced)


def rule_for(op) -> Rule | None:
    """`op`'s rule: registered for the overload, for its packet, then ours; None if none."""
    for key in (op, getattr(op, "overloadpacket", None)):
        if key is not None and key in _REGISTERED:
            return _REGISTERED[key]
    return RULES.get(op) or RULES_BY_NAME.get(_op_name(op))


def rule_strategies(node: fx.Node) -> list[AxisStrategy] | None:
    """The one-axis strategies `node`'s rule gives (None without a rule), checked: a list of
    (inputs, outputs) pairs with one placement per tensor input and per output."""
    fn = rule_for(node.target)
    if fn is None:
        return None
    try:
        result = fn(node)
    except Exception as e:
        e.add_note(f"in the sharding rule {_name(fn)} for {node.target} (node {node.name})")
        raise
    val = node.meta.get("val")
    n_in = len(tensor_inputs(node))
    n_out = len(val) if isinstance(val, (tuple, list)) else 1
    where = f"the sharding rule {_name(fn)} for {node.target} (node {node.name})"
    pair_help = ("return a list of (input placements, output placements) pairs, one placement "
                 f"per tensor input ({n_in} here, in argument order) and per output ({n_out})")
    if not isinstance(result, (list, tuple)):
        raise AutoparError(f"{where} returned {type(result).__name__}: {pair_help}")
    checked = []
    for i, s in enumerate(result):
        if not (isinstance(s, (tuple, list)) and len(s) == 2
                and all(isinstance(side, (tuple, list)) for side in s)):
            raise AutoparError(f"{where}: strategy {i} is {s!r}; {pair_help}")
        ins, outs = s
        if len(ins) != n_in or len(outs) != n_out:
            raise AutoparError(
                f"{where}: strategy {i} has {len(ins)} input and {len(outs)} output "
                f"placement(s), but {node.target} has {n_in} tensor input(s) and {n_out} "
                f"output(s) here; {pair_help}"
            )
        bad = [p for p in ins if not isinstance(p, Placement)]
        bad += [p for p in outs if p is not None and not isinstance(p, Placement)]
        if bad:
            raise AutoparError(f"{where}: strategy {i} holds {bad[0]!r}, not a placement: use "
                               "Replicate(), Shard(dim) or Partial() of torch.distributed.tensor")
        checked.append((tuple(ins), tuple(outs)))
    return checked


def _name(fn) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}.{name}" if module else name


def warn_fallbacks(fallback_ops: dict[str, int]) -> None:
    """One warning per op that runs replicated for want of a sharding rule (`Plan.fallback_ops`:
    op -> its number of nodes), pointing at the user's line that asked for the plan."""
    for op, count in sorted(fallback_ops.items()):
        nodes = "1 node runs" if count == 1 else f"{count} nodes run"
        warnings.warn(
            f"{op} has no sharding rule that fits its tensors, so its {nodes} whole on every "
            "rank, on gathered inputs. Register a rule with "
            f"autopar.register_rule(torch.ops.{op}, rule) to shard it (docs/rules.md)",
            NoShardingRuleWarning,
            stacklevel=_user_stacklevel(),
        )


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside autopar, for `warnings.warn` in our caller."""
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def expand_to_mesh(axis_strategies: list[AxisStrategy], ndim: int) -> list[tuple[tuple, tuple]]:
    """All combinations of one-axis strategies over `ndim` mesh axes.

    Returns (per-input placements tuple, per-output placements tuple), each placements tuple
    holding one placement per mesh axis.
    """
    out = []
    for combo in itertools.product(axis_strategies, repeat=ndim):
        n_in, n_out = len(combo[0][0]), len(combo[0][1])
        ins = tuple(tuple(c[0][i] for c in combo) for i in range(n_in))
        outs = tuple(tuple(c[1][i] for c in combo) for i in range(n_out))
        out.append((ins, outs))
    return out
