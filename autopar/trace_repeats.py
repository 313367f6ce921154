"""Trace a deep model through a shallow copy of it: each long run of identical blocks cut to a
few, the graph of the rest made by repeating the last kept block's nodes.

Export costs time in proportion to depth (GPT-3 175B: about 11 s for 96 blocks on the 2-core
machine, 1.5 s for 5), and the search traces once per microbatch size. The planner never needs
more than a few blocks of a run traced (`planning.stand_in` solves three), but the plan names
every node of the full graph, which the runtime traces for real and checks by fingerprint. So
the graph built here must be the one `trace` returns, node names included:

    trace_repeated(model, inputs, loss_fn=None, target=None) -> TracedModel   (as `trace`)
    tracer(model, loss_fn) -> trace_fn(inputs)   the planner's: trace_repeated, once per shape

A run is a stretch of a `nn.ModuleList`'s or `nn.Sequential`'s children that repeats with period
1 or 2 (Switch's dense and expert blocks) at least MIN_UNITS times (T5's first block, which
holds the position bias, and Swin's blocks of other widths stay out of it): same classes, parameter shapes and settings (`_signature`). It is cut to KEPT_UNITS units,
traced, and checked: each of the last two kept units must be the unit before it moved by one
(same ops, shapes and arguments; its inputs from inside itself at the same places, from the
unit before it at the same places there, anything else the very same node) and export must
have named their nodes with counters that step by the same amount. Only then are the dropped
units rebuilt from the last one, with their parameters, module paths and names, and what came
after the run reads the last unit. Anything else (no run, a run whose units do not repeat
cleanly, ops between blocks) falls back to `trace`: a slow plan, never a wrong one. The runtime
traces the model whole and refuses a plan whose fingerprint differs, and
`tests/test_trace_repeats.py` checks the fingerprints against `trace` for every built-in family.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import fx, nn

from autopar.errors import TraceError
from autopar.trace import (
    CONSTANT_PREFIX,
    WRAPPED,
    TracedModel,
    inputs_key,
    module_stack,
    trace,
    trace_for_training,
    unrun_graph_module,
)
from autopar.trace_sizes import SizedTracer

KEPT_UNITS = 4  # units of a run traced: the last is the template, three check it
MIN_UNITS = KEPT_UNITS + 1  # shorter runs are traced whole
MAX_OFFSET = 2  # leading children of a run that may differ from the rest
PERIODS = (1, 2)


@dataclass(frozen=True)
class Run:
    """Children `start` .. `start + units * period - 1` of the container `fqn` (a ModuleList or
    Sequential of `length` children): `units` repeats of `period` children."""

    fqn: str
    start: int
    period: int
    units: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.units * self.period

    def dropped_children(self) -> range:
        """The children the shallow copy drops: all units after the first KEPT_UNITS."""
        return range(self.start + KEPT_UNITS * self.period, self.end)

    def unit_of_child(self, i: int) -> int | None:
        return (i - self.start) // self.period if self.start <= i < self.end else None


def trace_repeated(model: nn.Module, example_inputs, *, loss_fn=None, target=None,
                   trace_with=None) -> TracedModel:
    """`trace(model, example_inputs, ...)`, through a shallow copy where the model has long
    runs of identical blocks (see the module docstring); the same graph either way.
    `trace_with`: what traces the shallow copy (or the model, without runs): `trace`'s
    signature (the planner's `trace_sizes.SizedTracer`); `trace` by default."""
    trace_with = trace_with or trace
    runs = find_runs(model)
    if not runs:
        return trace_with(model, example_inputs, loss_fn=loss_fn, target=target)
    saved = {}
    try:
        for run in runs:
            container = model.get_submodule(run.fqn)
            saved[run.fqn] = container._modules
            dropped = run.dropped_children()
            # the kept children keep their names: blocks after the run trace as themselves
            container._modules = {k: m for i, (k, m) in enumerate(container._modules.items())
                                  if i not in dropped}
        shallow = trace_with(model, example_inputs, loss_fn=loss_fn, target=target)
    except TraceError:  # a forward that needs every block (one that counts them, say)
        shallow = None
    finally:  # the user's model as it was
        for fqn, modules in saved.items():
            model.get_submodule(fqn)._modules = modules
    full = expand(shallow, runs) if shallow is not None else None
    return full or trace(model, example_inputs, loss_fn=loss_fn, target=target)


def tracer(model: nn.Module, loss_fn):
    """`trace_fn(inputs)` for one planning call: `trace_repeated`, once per input shape, so the
    probe of the whole batch is also the search's graph of a microbatch that size (the model
    does not change within one call); other batch sizes are made from one export
    (`trace_sizes.SizedTracer`)."""
    traces: dict = {}
    sized = SizedTracer()
    how = functools.partial(trace_repeated, trace_with=sized)

    def trace_fn(inputs):
        key = inputs_key(inputs)
        if key not in traces:
            traces[key] = trace_for_training(model, inputs, loss_fn, how=how)
        return traces[key]

    return trace_fn


def find_runs(model: nn.Module) -> list[Run]:
    """The outermost containers whose children repeat for at least MIN_UNITS units."""
    runs: list[Run] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or any(
                fqn.startswith(r.fqn + ".") for r in runs):
            continue
        children = list(module._modules.values())
        if len(children) < MIN_UNITS or any(c is None for c in children):
            continue
        sigs = _signatures(children)
        run = _repeat(fqn, sigs)
        if run is not None:
            runs.append(run)
    return runs


def _repeat(fqn: str, sigs: list) -> Run | None:
    """The longest run of one unit of 1 or 2 different children, if MIN_UNITS long; of equal
    ones the last, whose first unit follows more of its own kind (Switch's blocks after the
    dense first one: a unit of expert + dense from block 1 reads the first block's outputs
    otherwise than the units after it, dense + expert from block 2 does not)."""
    best = None
    for start in range(len(sigs)):
        for p in PERIODS:
            unit = sigs[start:start + p]
            if len(unit) < p or (p == 2 and unit[0] == unit[1]):
                continue
            n = 1
            while sigs[start + n * p:start + (n + 1) * p] == unit:
                n += 1
            if n >= MIN_UNITS and (best is None or n * p >= best.units * best.period):
                best = Run(fqn=fqn, start=start, period=p, units=n, length=len(sigs))
    return best


def _signatures(children: list[nn.Module]) -> list[tuple]:
    """What blocks of one kind share: classes, parameter and buffer shapes and dtypes, and
    plain settings, each child's. An int setting that counts the block's place (Hugging Face's
    `layer_idx`: i or i + 1 in child i) is left out: every block has its own."""
    raw = [_signature(c) for c in children]
    counters = set()
    for key in {k for k, _ in raw[0][1]}:
        values = [dict(r[1]).get(key) for r in raw]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and any(
                values == [i + c for i in range(len(values))] for c in (0, 1)):
            counters.add(key)
    return [(structure, tuple(kv for kv in settings if kv[0] not in counters))
            for structure, settings in raw]


def _signature(module: nn.Module) -> tuple:
    structure, settings = [], []
    for name, m in module.named_modules():
        structure.append((
            name, type(m).__qualname__,
            tuple((k, tuple(t.shape), t.dtype) for k, t in m._parameters.items() if t is not None),
            tuple((k, tuple(t.shape), t.dtype) for k, t in m._buffers.items() if t is not None)))
        for k, v in vars(m).items():
            if not k.startswith("_") and k != "training" and (
                    v is None or isinstance(v, (bool, int, float, str))):
                settings.append(((name, k), v))
    return tuple(structure), tuple(settings)


# ---- expanding the shallow graph -------------------------------------------------------------

_SUFFIX = re.compile(r"^(.*?)(?:_(\d+))?$")


def _split_name(name: str) -> tuple[str, int]:
    base, num = _SUFFIX.match(name).groups()
    return base, int(num) if num else 0


def _name(base: str, num: int) -> str:
    return f"{base}_{num}" if num else base


def expand(shallow: TracedModel, runs: list[Run]) -> TracedModel | None:
    """The full model's graph from the shallow one, or None where the kept units do not repeat
    cleanly (the caller then traces the model whole)."""
    gm = shallow.graph_module
    nodes = list(gm.graph.nodes)
    fqn_of = {**shallow.parameters, **shallow.buffers}
    place: dict[str, tuple[int, int]] = {}  # node -> (run, unit)
    for n in nodes:
        where = _place_of(n, runs, fqn_of)
        if where is not None:
            place[n.name] = where
    plans = []
    for r, run in enumerate(runs):
        unit_nodes = [[n for n in nodes if place.get(n.name) == (r, u)] for u in range(KEPT_UNITS)]
        plan = _check_run(run, r, unit_nodes, nodes, place, shallow)
        if plan is None:
            return None
        plans.append(plan)
    return _rebuild(shallow, runs, plans, place)


def _place_of(n: fx.Node, runs: list[Run], fqn_of: dict) -> tuple[int, int] | None:
    """(run, unit) of a node made inside a kept unit, or of a unit's parameter or buffer."""
    if n.op == "placeholder":
        paths = [fqn_of.get(n.name, "").removeprefix(CONSTANT_PREFIX)]
    elif n.op == "call_function":
        paths = [fqn for fqn, _ in module_stack(n)]
    else:
        return None
    for r, run in enumerate(runs):
        head = run.fqn + "."
        for path in paths:
            if path.startswith(head):
                child = int(path[len(head):].split(".")[0])
                unit = run.unit_of_child(child)
                return None if unit is None else (r, unit)
    return None


@dataclass
class _RunPlan:
    units: list[list[fx.Node]]  # kept units' nodes (placeholders first), graph order
    step: dict[str, int]  # template node -> how far export's counter for it moves per unit
    base_step: dict[str, int]  # name base -> counter steps per unit (names after the run shift)


def _check_run(run: Run, r: int, units: list[list[fx.Node]], nodes: list[fx.Node],
               place: dict, shallow: TracedModel) -> _RunPlan | None:
    """How the run repeats, if its kept units show it cleanly."""
    if any(not u for u in units) or len({len(u) for u in units[1:]}) != 1:
        return None  # (the first unit reads what came before the run: it may differ)
    ops = [[n for n in u if n.op == "call_function"] for u in units]
    # a unit's ops are contiguous and in unit order: nothing runs between blocks
    index = {n.name: i for i, n in enumerate(nodes)}
    span = [n for n in nodes[index[ops[0][0].name]:index[ops[-1][-1].name] + 1]
            if n.op == "call_function"]
    if [n.name for n in span] != [n.name for u in ops for n in u]:
        return None
    step: dict[str, int] = {}
    for u in (KEPT_UNITS - 1, KEPT_UNITS - 2):
        for a, b in zip(units[u], units[u - 1]):
            if not _same_but_moved(a, b, r, u, place, units):
                return None
            (base, na), (base_b, nb) = _split_name(a.name), _split_name(b.name)
            constant = _kind_of(a, shallow) == "constant"
            if constant:  # a lifted constant: the same value in every unit, or no repeat
                va, vb = (shallow.constants[shallow.buffers[x.name]] for x in (a, b))
                if va.shape != vb.shape or va.dtype != vb.dtype or not torch.equal(va, vb):
                    return None
            elif a.op == "placeholder":
                continue
            if not constant and base != base_b:
                return None
            template = units[-1][units[u].index(a)].name
            if step.setdefault(template, na - nb) != na - nb:
                return None
    base_step: dict[str, int] = {}
    for name, s in step.items():
        if name in shallow.buffers:
            continue  # a constant's counter is its own, not an op name's
        if base_step.setdefault(_split_name(name)[0], s) != s:
            return None
    return _RunPlan(units=units, step=step, base_step=base_step)


def _same_but_moved(a: fx.Node, b: fx.Node, r: int, u: int, place: dict, units) -> bool:
    """Node `a` of unit u is node `b` of unit u - 1 moved on by one unit."""
    if a.op != b.op or (a.op == "call_function" and a.target != b.target):
        return False
    if _shapes(a) != _shapes(b):
        return False
    if a.op == "placeholder":
        return True

    def moved(x, y) -> bool:
        if isinstance(x, fx.Node) != isinstance(y, fx.Node):
            return False
        if not isinstance(x, fx.Node):
            if isinstance(x, (tuple, list)) and isinstance(y, (tuple, list)):
                return len(x) == len(y) and all(moved(i, j) for i, j in zip(x, y))
            if isinstance(x, dict) and isinstance(y, dict):
                return x.keys() == y.keys() and all(moved(x[k], y[k]) for k in x)
            return type(x) is type(y) and x == y
        px, py = place.get(x.name), place.get(y.name)
        if px == (r, u) or px == (r, u - 1):  # inside the unit, or from the one before it
            return py == (px[0], px[1] - 1) and (
                units[px[1]].index(x) == units[py[1]].index(y))
        return x is y  # anything else: the very same node

    return moved(a.args, b.args) and moved(a.kwargs, b.kwargs)


def _shapes(n: fx.Node):
    v = n.meta.get("val")
    vals = v if isinstance(v, (tuple, list)) else (v,)
    return tuple((tuple(x.shape), x.dtype) if hasattr(x, "shape") else repr(type(x))
                 for x in vals)


def _kind_of(n: fx.Node, shallow: TracedModel) -> str:
    """Export puts parameters, buffers and lifted constants in three groups: each group's
    copies go after the template's last of that group."""
    if n.op == "placeholder":
        if n.name not in shallow.buffers:
            return "parameter"
        return "constant" if shallow.buffers[n.name].startswith(CONSTANT_PREFIX) else "buffer"
    return n.op


def _rebuild(shallow: TracedModel, runs: list[Run], plans: list[_RunPlan],
             place: dict) -> TracedModel | None:
    """Copy the shallow graph in order; after the template unit's last parameter, buffer and op,
    the dropped units' own; the op counters of everything after a run move on by what the
    dropped units used."""
    gm = shallow.graph_module
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}  # shallow node -> its node in the full graph
    copies: dict[tuple[int, int], list] = {}  # (run, unit) -> its nodes in the full graph
    shift: dict[str, int] = {}  # name base -> counter steps the dropped units used so far
    parameters = dict(shallow.parameters)
    buffers = dict(shallow.buffers)
    constants = dict(shallow.constants)
    last_of = {}  # the template's last node of each kind -> (run, kind): copies go after it
    for r, plan in enumerate(plans):
        for kind in ("parameter", "buffer", "constant", "call_function"):
            own = [n for n in plan.units[-1] if _kind_of(n, shallow) == kind]
            if own:
                last_of[own[-1].name] = (r, kind)

    def create(n: fx.Node, name: str, lookup, meta=None) -> fx.Node | None:
        target = name if n.op == "placeholder" else n.target  # a placeholder's is its name
        new = graph.create_node(n.op, target, fx.node.map_arg(n.args, lookup),
                                fx.node.map_arg(n.kwargs, lookup), name, n.type)
        new.meta = dict(n.meta) if meta is None else meta
        return new if new.name == name else None  # taken: export would have named it otherwise

    def counted(name: str, more: int = 0) -> str:
        base, num = _split_name(name)
        return _name(base, num + shift.get(base, 0) + more) if num else name

    def read(a: fx.Node) -> fx.Node:
        """What a kept node reads: outside every run, a node of a kept unit's last two moves to
        the run's last two units (the template's copies)."""
        where = place.get(a.name)
        if where is not None and where[1] >= KEPT_UNITS - 2:
            r, u = where
            return copies[(r, u + runs[r].units - KEPT_UNITS)][plans[r].units[u].index(a)]
        return env[a.name]

    for n in gm.graph.nodes:
        where = place.get(n.name)
        lookup = read if where is None else (lambda a: env[a.name])
        new = create(n, counted(n.name) if n.op == "call_function" else n.name, lookup)
        if new is None:
            return None
        env[n.name] = new
        if where is not None:
            units = plans[where[0]].units
            copies.setdefault(where, [None] * len(units[where[1]]))[units[where[1]].index(n)] = new
        if n.name not in last_of:
            continue
        r, kind = last_of[n.name]
        run, plan = runs[r], plans[r]
        template = plan.units[-1]
        for u in range(KEPT_UNITS, run.units):
            moved_by = u - (KEPT_UNITS - 1)
            mine = copies.setdefault((r, u), [None] * len(template))

            def inside(a, u=u, r=r, plan=plan):
                w = place.get(a.name)
                if w is not None and w[0] == r and w[1] >= KEPT_UNITS - 2:
                    return copies[(r, u + w[1] - (KEPT_UNITS - 1))][plan.units[w[1]].index(a)]
                return env[a.name]

            for k, t in enumerate(template):
                if _kind_of(t, shallow) != kind:
                    continue
                if kind == "call_function":
                    new = create(t, counted(t.name, moved_by * plan.step[t.name]), inside,
                                 _moved_meta(t.meta, run, moved_by))
                else:
                    table = parameters if kind == "parameter" else buffers
                    name, fqn = _moved_state(t.name, table[t.name], run, moved_by,
                                             plan.step.get(t.name, 0))
                    new = create(t, name, inside) if name else None
                    if new is not None:
                        table[name] = fqn
                        if kind == "constant":
                            constants[fqn] = shallow.constants[table[t.name]]
                if new is None:
                    return None
                mine[k] = new
        if kind == "call_function":
            for base, s in plan.base_step.items():
                shift[base] = shift.get(base, 0) + s * (run.units - KEPT_UNITS)
    renamed = {k: v.name for k, v in env.items()}
    return TracedModel(
        graph_module=unrun_graph_module(gm, graph),
        parameters=parameters,
        buffers=buffers,
        inputs=[renamed[x] for x in shallow.inputs],
        target=renamed[shallow.target] if shallow.target else None,
        loss_node=renamed[shallow.loss_node],
        output_node=renamed[shallow.output_node],
        model_name=shallow.model_name,
        layout=shallow.layout,
        constants=constants,
    )


def _moved_state(name: str, fqn: str, run: Run, moved_by: int,
                 step: int) -> tuple[str | None, str]:
    """The placeholder name and FQN of a parameter, buffer or lifted constant `moved_by` units
    on, named as export names it ("p_", "b_" or "c_", then the wrapped FQN with dots as
    underscores; a lifted constant's FQN ends in a counter that runs across blocks, moved on by
    `step` a unit)."""
    prefix = CONSTANT_PREFIX if fqn.startswith(CONSTANT_PREFIX) else ""
    path = fqn.removeprefix(prefix)
    head = run.fqn + "."
    child, _, tail = path[len(head):].partition(".")
    new_child = int(child) + moved_by * run.period
    old_part = f"{WRAPPED}.{head}{child}.".replace(".", "_").lower()
    new_part = f"{WRAPPED}.{head}{new_child}.".replace(".", "_").lower()
    if old_part not in name.lower() or name.lower().count(old_part) != 1:
        return None, fqn
    at = name.lower().index(old_part)
    name = name[:at] + new_part + name[at + len(old_part):]
    if step:  # lifted_tensor_33 -> lifted_tensor_41
        base, num = _split_name(name)
        tail_base, tail_num = _split_name(tail)
        if not num or num != tail_num:
            return None, fqn
        name, tail = _name(base, num + moved_by * step), _name(tail_base, tail_num + moved_by * step)
    return name, f"{prefix}{head}{new_child}.{tail}"


def _moved_meta(meta: dict, run: Run, moved_by: int) -> dict:
    """A template node's metadata for its copy `moved_by` units on: module paths moved."""
    meta = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        head = f"{WRAPPED}.{run.fqn}."
        moved = {}
        for key, (path, kind) in stack.items():
            if path.startswith(head):
                rest = path[len(head):]
                child, _, tail = rest.partition(".")
                new_child = str(int(child) + moved_by * run.period)
                new_path = head + new_child + ("." + tail if tail else "")
                key = key.replace(path, new_path) if path in key else key
                path = new_path
            moved[key] = (path, kind)
        meta["nn_module_stack"] = moved
    return meta
