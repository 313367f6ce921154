"""Faster answers from DTensor's sharding propagation, the same answers.

The planner asks DTensor's propagator thousands of questions a plan (`dtensor.propagate`). Each
context manager here patches one private piece of the propagator while it asks, keeping or
skipping work whose result is known; `while_propagating` enters them all. Each says what it
keeps and why it is the same answer; `tests/test_dtensor.py` and
`tests/planning/test_fixed_points.py` compare them with DTensor's own way. Like `dtensor`, this
module reaches into DTensor's private API, and each piece steps aside (DTensor's own way) on a
torch release without what it patches.
"""

from __future__ import annotations

import contextlib
import logging

from torch.distributed.tensor import DTensor, Partial
from torch.utils._pytree import tree_map

try:  # private, and new in torch 2.12 or so: without it, DTensor's own way is used
    from torch.distributed.tensor.placement_types import _StridedShard, _StridedShardOffsetMode
except ImportError:
    _StridedShard = _StridedShardOffsetMode = None


@contextlib.contextmanager
def while_propagating():
    """Every speed-up below, for the span of one question to DTensor's propagator."""
    with _quiet_fake_tensor_log(), _strided_sizes_by_arithmetic(), _output_meta_kept(), \
            _redistribute_costs_kept(), _shard_orders_kept(), _expansion_shortcuts():
        yield


@contextlib.contextmanager
def _quiet_fake_tensor_log():
    # `disabled`, not setLevel: setLevel clears the level cache of every logger, twice per
    # probe, which was a tenth of a plan's time
    log = logging.getLogger("torch._subclasses.fake_tensor")
    disabled = log.disabled
    log.disabled = True
    try:
        yield
    finally:
        log.disabled = disabled


_OUTPUT_META: dict = {}  # (op, inputs' global shapes, strides, dtypes, other args) -> metas


def _meta_key(schema) -> str | None:
    """What an op's global output metadata depends on: the op and its args, tensors by global
    shape, stride and dtype (not placement); None where a size is symbolic."""
    symbolic = []

    def conv(a):
        meta = getattr(a, "tensor_meta", None)
        if meta is not None:
            if not all(type(x) is int for x in (*meta.shape, *meta.stride)):
                symbolic.append(a)
            return ("T", tuple(meta.shape), tuple(meta.stride), str(meta.dtype))
        return a
    key = repr((str(schema.op), tree_map(conv, (schema.args_schema, schema.kwargs_schema))))
    return None if symbolic else key


@contextlib.contextmanager
def _output_meta_kept():
    """While propagating: DTensor's global output metadata of an op (found by running it on
    fake tensors) kept per `_meta_key`. It does not depend on the placements, and the probes
    ask each op under many; running it every time was a sixth of the DTensor time of a plan."""
    prop = DTensor._op_dispatcher.sharding_propagator
    compute = type(prop)._propagate_tensor_meta_non_cached

    def kept(schema):
        key = _meta_key(schema)
        if key is None:
            return compute(prop, schema)
        if key not in _OUTPUT_META:
            _OUTPUT_META[key] = compute(prop, schema)
        return _OUTPUT_META[key]

    prop._propagate_tensor_meta_non_cached = kept  # the instance's, shadowing the class's
    try:
        yield
    finally:
        del prop._propagate_tensor_meta_non_cached


_REDISTRIBUTE_COST: dict = {}  # (meshes, specs' placements, orders, tensor metadata) -> cost
try:  # private: where DTensor's strategy expansion prices a move between two specs
    from torch.distributed.tensor._ops import utils as _strategy_utils
except ImportError:
    _strategy_utils = None


def _spec_key(spec):
    meta = spec.tensor_meta
    return (spec.placements, spec.shard_order,
            None if meta is None else (tuple(meta.shape), tuple(meta.stride), meta.dtype))


@contextlib.contextmanager
def _redistribute_costs_kept():
    """While propagating: DTensor's price of moving a tensor from one spec to another, kept per
    (both meshes, both specs' placements and shard orders, the tensor's shape, stride and
    dtype), all it reads (a mesh by DeviceMesh equality: its ranks, layout, device type and
    names). Every strategy DTensor expands prices a move from each input's spec: a third of
    a plan's DTensor time went there, mostly on the same moves asked again."""
    original = getattr(_strategy_utils, "redistribute_cost", None)
    if original is None:  # another torch: nothing to speed up
        yield
        return

    def kept(current, target):
        try:
            key = (current.mesh, target.mesh, _spec_key(current), _spec_key(target))
            hash(key)
        except (AttributeError, TypeError):  # a spec of another form: DTensor's own way
            return original(current, target)
        if key not in _REDISTRIBUTE_COST:
            _REDISTRIBUTE_COST[key] = original(current, target)
        return _REDISTRIBUTE_COST[key]

    _strategy_utils.redistribute_cost = kept
    try:
        yield
    finally:
        _strategy_utils.redistribute_cost = original


try:  # private: where DTensor expands a one-axis rule to every axis of the mesh
    from torch.distributed.tensor import _sharding_prop as _sharding_prop_module
    from torch.distributed.tensor._op_schema import OpSpec as _OpSpec
    from torch.distributed.tensor._op_schema import OpStrategy as _OpStrategy
    from torch.distributed.tensor._ops import single_dim_strategy as _single_dim
    _PreparedSingleDim = _single_dim._PreparedSingleDimStrategy
except (ImportError, AttributeError):
    _sharding_prop_module = _single_dim = _PreparedSingleDim = _OpStrategy = _OpSpec = None


# False: DTensor's full expansion for every question (tests compare the two)
EXPANSION_SHORTCUTS = True
_EXPANSIONS: dict = {}  # (mesh, op, inputs' metadata, other args, sharded?) -> `_Expansion`


@contextlib.contextmanager
def _expansion_shortcuts():
    """While propagating, two shortcuts past DTensor's expansion of a one-axis rule over every
    mesh axis, which on a 3-axis mesh (dp x ep x tp) prices hundreds of combinations a question
    (most of an MoE plan's DTensor time).

    First: where the inputs' placements already match one of a one-axis rule's strategies on
    every mesh axis (and shard their tensors evenly), that strategy is the answer, at no cost,
    found by DTensor's own lookup (`try_propagate`, the first step of its priority-queue
    search). DTensor's full expansion picks the same strategy (the one needing no move); tests
    compare the two. Most of what the planner asks is of this kind (each answer is confirmed
    by asking it again).

    Second, for the other questions: the expansion's strategies are the same for every question
    with the same op, tensor metadata and other args (while every input shards evenly and some
    input is Shard-split, or none is: which sharding kinds fill a rule's placeholders), so they
    are kept from the first question (`_Expansion`) and only priced again for the next one, by
    DTensor's own cost function, and DTensor's own selection picks among them."""
    original = getattr(_sharding_prop_module, "_expand_single_dim_strategy_to_mesh", None)
    if not EXPANSION_SHORTCUTS or original is None or _PreparedSingleDim is None or not hasattr(
            _PreparedSingleDim, "try_propagate"):  # another torch: DTensor's own way
        yield
        return

    def expand(mesh, op_schema, strategy_info, output_tensor_meta):
        full = original(mesh, op_schema, strategy_info, output_tensor_meta)

        def expanded(op, args_schema, kwargs_schema):
            specs = _plain_inputs(mesh, op_schema)
            if specs is None:
                return full(op, args_schema, kwargs_schema)
            fixed = _fixed_point(mesh, op_schema, specs, strategy_info, output_tensor_meta)
            if fixed is not None:
                return fixed
            key = _expansion_key(mesh, op_schema, specs, strategy_info)
            if key is None:
                return full(op, args_schema, kwargs_schema)
            if key in _EXPANSIONS:
                return _EXPANSIONS[key].priced(op_schema)
            result = full(op, args_schema, kwargs_schema)
            _EXPANSIONS[key] = _Expansion(result)
            return result
        return expanded

    _sharding_prop_module._expand_single_dim_strategy_to_mesh = expand
    try:
        yield
    finally:
        _sharding_prop_module._expand_single_dim_strategy_to_mesh = original


def _fixed_point(mesh, op_schema, specs, strategy_info, output_tensor_meta):
    """DTensor's strategy for inputs (`specs`, from `_plain_inputs`) that already match one on
    every axis, else None (the full expansion answers then)."""
    try:
        prepared = _PreparedSingleDim(strategy_info, op_schema, output_tensor_meta,
                                      num_inputs=len(specs))
    except Exception:  # the rule wants something the lookup does not give it
        return None
    placements = tuple(s.placements for s in specs)
    if _ambiguous(prepared, placements):
        return None
    found = prepared.try_propagate(mesh, placements, specs)
    if found is None or any(_mixed_partials(spec.placements)
                            for spec in _specs(found.strategies[0].output_specs)):
        return None  # the full expansion skips a strategy with mixed partial outputs
    return found


def _plain_inputs(mesh, op_schema):
    """The tensor inputs' specs, in order, where both shortcuts apply; None for an in-place op,
    no tensor input, or an input that is not a plain OpStrategy (lists, keyword tensors), is on
    another mesh, is placed by a _StridedShard or a Partial subclass, or is of symbolic size."""
    if op_schema.op.name().split("::")[-1].split(".")[0].endswith("_"):
        return None
    if any(isinstance(v, _OpStrategy) or type(v).__name__ == "TupleStrategy"
           for v in op_schema.kwargs_schema.values()):
        return None
    specs = []
    for arg in op_schema.args_schema:
        if isinstance(arg, _OpStrategy):
            if len(arg.strategies) != 1:
                return None
            specs.append(arg.strategies[0].output_spec)
        elif type(arg).__name__ == "TupleStrategy":
            return None
    for spec in specs:
        if any(_StridedShard is not None and isinstance(p, _StridedShard)
               or isinstance(p, Partial) and type(p) is not Partial for p in spec.placements):
            return None  # (a _MaskPartial is equal to itself only: DTensor moves it anyway)
        meta = spec.tensor_meta
        if meta is None or not all(type(x) is int for x in (*meta.shape, *meta.stride)):
            return None
    if not specs or any(s.mesh != mesh for s in specs):
        return None
    return specs


def _expansion_key(mesh, op_schema, specs, strategy_info):
    """What DTensor's expansion of `op_schema` (inputs `specs`, from `_plain_inputs`) depends on
    besides the inputs' placements, or None where it depends on them too (inputs not sharding
    evenly; rules taking args from other meshes)."""
    if getattr(strategy_info, "different_mesh_args", None):
        return None
    if not all(_strategy_utils.is_tensor_shardable(s.tensor_meta.shape, s) for s in specs):
        return None  # an uneven input may keep its own placements: the strategies differ

    def meta(a):
        if isinstance(a, _OpStrategy):
            m = a.strategies[0].output_spec.tensor_meta
            return ("T", tuple(m.shape), tuple(m.stride), str(m.dtype))
        return a
    try:
        rest = repr(tree_map(meta, (op_schema.args_schema, op_schema.kwargs_schema)))
    except Exception:
        return None
    sharded = any(type(p).__name__ == "Shard" for s in specs for p in s.placements)
    key = (mesh, str(op_schema.op), rest, sharded)
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _Expansion:
    """DTensor's strategies for one `_expansion_key`, to be priced for other inputs: for each
    input, its distinct target specs, and each strategy's index into them."""

    def __init__(self, result):
        self.strategies = [(s.output_specs, list(s.input_specs)) for s in result.strategies]
        n_in = len(self.strategies[0][1]) if self.strategies else 0
        self.targets: list[list] = [[] for _ in range(n_in)]
        self.index: list[tuple[int, ...]] = []
        seen: list[dict] = [{} for _ in range(n_in)]
        for _, ins in self.strategies:
            row = []
            for i, spec in enumerate(ins):
                k = spec.placements
                if k not in seen[i]:
                    seen[i][k] = len(self.targets[i])
                    self.targets[i].append(spec)
                row.append(seen[i][k])
            self.index.append(tuple(row))

    def priced(self, op_schema):
        """The strategies, each priced for `op_schema`'s inputs as DTensor prices them."""
        args = [a for a in op_schema.args_schema if isinstance(a, _OpStrategy)]
        costs = [[_strategy_utils.generate_redistribute_costs(arg, t) for t in targets]
                 for arg, targets in zip(args, self.targets)]
        return _OpStrategy([
            _OpSpec(output_specs=outs, input_specs=ins,
                    redistribute_cost=[costs[i][k] for i, k in enumerate(row)])
            for (outs, ins), row in zip(self.strategies, self.index)])


def _ambiguous(prepared, placements) -> bool:
    """Whether, on some axis, the inputs' placements match two strategies with different
    outputs: the lookup takes the first, DTensor's selection the last."""
    n_out = prepared.num_outputs
    outputs: dict = {}
    twice = set()
    for strategy in prepared.expanded_strategies:
        key, out = tuple(strategy[n_out:]), tuple(strategy[:n_out])
        if outputs.setdefault(key, out) != out:
            twice.add(key)
    return bool(twice) and any(tuple(pl[axis] for pl in placements) in twice
                               for axis in range(len(placements[0])))


def _specs(output_specs):
    if output_specs is None:
        return ()
    return tuple(s for s in (output_specs if isinstance(output_specs, tuple)
                             else (output_specs,)) if s is not None)


def _mixed_partials(placements) -> bool:
    """Partials of more than one kind on one tensor (sum with avg of one type excepted), which
    DTensor's expansion never offers."""
    kinds = {(type(p), p.reduce_op) for p in placements if isinstance(p, Partial)}
    if len(kinds) < 2:
        return False
    return not (len({t for t, _ in kinds}) == 1 and {op for _, op in kinds} == {"sum", "avg"})


try:  # private: the spec every strategy DTensor expands is made of
    from torch.distributed.tensor._dtensor_spec import DTensorSpec as _DTensorSpec
except ImportError:
    _DTensorSpec = None
_SHARD_ORDER: dict = {}  # placements -> DTensorSpec.compute_default_shard_order(placements)
_VERIFIED: set = set()  # (placements, shard order) pairs DTensorSpec has verified


@contextlib.contextmanager
def _shard_orders_kept():
    """While propagating: a spec's default shard order, and the check that a shard order
    matches its placements, done once per placements (both are functions of them alone). Every
    DTensorSpec made computes and checks one: a fifth of a plan's DTensor time went there, on
    the same few placements."""
    cls = _DTensorSpec
    compute = cls.__dict__.get("compute_default_shard_order") if cls is not None else None
    verify = cls.__dict__.get("_verify_shard_order") if cls is not None else None
    if not isinstance(compute, staticmethod) or verify is None:  # another torch
        yield
        return

    def computed(placements):
        try:
            return _SHARD_ORDER[placements]
        except KeyError:
            order = _SHARD_ORDER[placements] = compute.__func__(placements)
            return order
        except TypeError:  # unhashable placements: DTensor's own way
            return compute.__func__(placements)

    def verified(self, shard_order):
        try:
            key = (self.placements, shard_order)
            if key in _VERIFIED:
                return
        except TypeError:
            return verify(self, shard_order)
        verify(self, shard_order)  # raises where they do not match: nothing is kept then
        _VERIFIED.add(key)

    cls.compute_default_shard_order = staticmethod(computed)
    cls._verify_shard_order = verified
    try:
        yield
    finally:
        cls.compute_default_shard_order = compute
        cls._verify_shard_order = verify


def _strided_local_size(size: int, split_factor: int, num_chunks: int, rank: int) -> int:
    """The length of `rank`'s piece of a dim of `size` under `_StridedShard(split_factor)`
    over `num_chunks` ranks: the dim is chunked into `split_factor` pieces and each piece into
    `num_chunks`, as torch.chunk does (chunks of ceil(n / k)); the rank holds its chunk of every
    piece. The same sums torch's `local_shard_size_and_offset` does for unbacked sizes."""
    total, first = 0, -(-size // split_factor)
    for i in range(split_factor):
        n = max(0, min(first * (i + 1), size) - min(first * i, size))
        second = -(-n // num_chunks)
        total += max(0, min(second * (rank + 1), n) - min(second * rank, n))
    return total


@contextlib.contextmanager
def _strided_sizes_by_arithmetic():
    """While propagating: the local size of a `_StridedShard` dim by arithmetic.

    DTensor finds it (to rewrite a view's shape args to local sizes) by building an arange over
    the whole dim and splitting it: on GPT-3's 3M-row activations that was a fifth of a plan's
    DTensor time. Only the size is asked there (offsets skipped); other calls go to torch."""
    cls = _StridedShard
    original = cls.__dict__.get("local_shard_size_and_offset") if cls is not None else None
    if original is None:  # another torch: nothing to speed up
        yield
        return

    def local_size_and_offset(self, curr_local_size, num_chunks, rank,
                              offset_mode=_StridedShardOffsetMode.FIRST):
        if (_StridedShardOffsetMode(offset_mode) is _StridedShardOffsetMode.NONE
                and type(curr_local_size) is int and type(rank) is int
                and type(self.split_factor) is int):
            return _strided_local_size(curr_local_size, self.split_factor, num_chunks, rank), None
        return original(self, curr_local_size, num_chunks, rank, offset_mode)

    cls.local_shard_size_and_offset = local_size_and_offset
    try:
        yield
    finally:
        cls.local_shard_size_and_offset = original
