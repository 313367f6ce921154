"""Stage-cut instances shared by the tests of solvers' pipeline modules: hand-made layers and
problems, and seeded random generators (mixed layers, runs of identical layers, a GPT-like stack).
"""

import dataclasses
import math
import random

from solvers import Layer, LayerOption, PipelineProblem

INF = math.inf
NONE = LayerOption(name="none", fwd_s=1.0, bwd_s=2.0, activation_bytes=10.0)
FULL = LayerOption(name="full", fwd_s=1.0, bwd_s=3.0, activation_bytes=2.0)


def layer(name, options=(NONE,), state_bytes=0.0, boundary_bytes=0.0):
    return Layer(
        name=name, options=tuple(options), state_bytes=state_bytes, boundary_bytes=boundary_bytes
    )


def problem(layers, num_stages=2, num_microbatches=4, in_flight=None, **kwargs):
    if in_flight is None:  # 1F1B: stage s holds min(S - s, m) microbatches
        in_flight = tuple(min(num_stages - s, num_microbatches) for s in range(num_stages))
    return PipelineProblem(
        layers=tuple(layers),
        num_stages=num_stages,
        num_microbatches=num_microbatches,
        in_flight=tuple(in_flight),
        **kwargs,
    )


def interleaved(layers, **kwargs):
    """pp = 2 ranks, v = 2 stages each (0, 2 on rank 0; 1, 3 on rank 1), one microbatch in
    flight per stage, m = 4, b = 1/v = 1/2."""
    return problem(
        layers,
        num_stages=4,
        in_flight=(1, 1, 1, 1),
        stage_of_rank=(0, 1, 0, 1),
        bubble_weight=0.5,
        **kwargs,
    )


def random_layer(rng: random.Random, name: str, num_options: int) -> Layer:
    """A layer with `num_options` random options and random state and boundary bytes."""
    options = tuple(
        LayerOption(
            name=f"opt{j}",
            fwd_s=round(rng.uniform(0.0, 5.0), 3),
            bwd_s=round(rng.uniform(0.0, 10.0), 3),
            activation_bytes=float(rng.randint(0, 100)) * 1e6,
        )
        for j in range(num_options)
    )
    return layer(
        name,
        options=options,
        state_bytes=float(rng.randint(0, 100)) * 1e6,
        boundary_bytes=float(rng.randint(0, 100)) * 1e6,
    )


def random_problem(rng: random.Random) -> PipelineProblem:
    n = rng.randint(2, 7)
    S = rng.randint(1, min(4, n))
    m = rng.randint(1, 6)
    layers = []
    for k in range(n):
        layers.append(random_layer(rng, f"layer{k}", rng.randint(1, 3)))
    stage_of_rank, bubble_weight = (), 1.0
    divisors = [pp for pp in range(1, S) if S % pp == 0]
    if divisors and rng.random() < 0.3:
        pp = rng.choice(divisors)
        stage_of_rank = tuple(s % pp for s in range(S))
        bubble_weight = rng.choice((1.0, pp / S))  # 1 / v with v = S / pp
    if rng.random() < 0.5:
        in_flight = tuple(min(S - s, m) for s in range(S))
    else:
        in_flight = tuple(rng.randint(0, m) for _ in range(S))
    total_bytes = sum(
        lay.state_bytes + max(in_flight) * max(o.activation_bytes for o in lay.options)
        for lay in layers
    )
    budget = INF
    if rng.random() < 0.85:  # never exactly on a peak: peaks are whole megabytes
        budget = float(rng.randint(0, int(total_bytes / 1e6 * 0.8))) * 1e6 + 0.5e6
    return with_random_links(rng, layers, S, m, in_flight, stage_of_rank, budget, bubble_weight)


def with_random_links(rng, layers, S, m, in_flight, stage_of_rank, budget, bubble_weight):
    """The problem, with a random pp link (free, or a random bandwidth and latency)."""
    return PipelineProblem(
        layers=tuple(layers),
        num_stages=S,
        num_microbatches=m,
        in_flight=in_flight,
        stage_of_rank=stage_of_rank,
        memory_budget_bytes=budget,
        p2p_s_per_byte=rng.choice((0.0, 1e-8 * rng.randint(1, 10))),
        p2p_latency_s=rng.choice((0.0, round(rng.uniform(0.0, 1.0), 3))),
        bubble_weight=bubble_weight,
    )


def repeated_problem(rng: random.Random) -> PipelineProblem:
    """A random problem whose layers come in runs of identical copies (a stack of equal
    blocks), where the ILP's symmetry-breaking rows apply."""
    p = random_problem(rng)
    layers, k = [], 0
    while len(layers) < 8:
        template = rng.choice(p.layers)
        for _ in range(rng.randint(1, 4)):
            layers.append(dataclasses.replace(template, name=f"copy{k}"))
            k += 1
    layers = layers[:8]
    S = min(p.num_stages + 1, 5)
    return dataclasses.replace(
        p,
        layers=tuple(layers),
        num_stages=S,
        stage_of_rank=(),
        in_flight=tuple(min(S - s, p.num_microbatches) for s in range(S)),
        bubble_weight=1.0,
    )


def run_template(rng: random.Random, tag: int) -> Layer:
    """A layer with 1-3 random options; copies of it (renamed) make a run."""
    return random_layer(rng, f"template{tag}", rng.choice((1, 2, 2, 3)))


def random_ranks(rng: random.Random, S: int) -> tuple[tuple[int, ...], float]:
    """stage_of_rank and bubble weight: one stage per rank, interleaved (s % pp), or any map."""
    kind = rng.choice(("own", "interleaved", "any"))
    divisors = [pp for pp in range(1, S) if S % pp == 0]
    if kind == "interleaved" and divisors:
        pp = rng.choice(divisors)
        return tuple(s % pp for s in range(S)), rng.choice((1.0, pp / S))
    if kind == "any" and S > 1:
        R = rng.randint(1, S - 1)
        ranks = list(range(R)) + [rng.randrange(R) for _ in range(S - R)]
        rng.shuffle(ranks)
        return tuple(ranks), 1.0
    return (), 1.0


MAX_PLANS = 6000  # brute force tries them all: keeps each instance near 0.1 s


def runs_problem(rng: random.Random) -> PipelineProblem:
    """Runs of identical layers (1-3 options) cut into 1-6 stages, on interleaved or arbitrary
    ranks, with random in-flight counts and budgets (some infeasible)."""
    while True:
        L = rng.randint(3, 10)
        S = rng.randint(1, min(6, L))
        layers = []
        while len(layers) < L:
            template = run_template(rng, len(layers))
            for _ in range(min(rng.randint(1, 5), L - len(layers))):
                layers.append(dataclasses.replace(template, name=f"layer{len(layers)}"))
        plans = math.comb(L - 1, S - 1) * math.prod(len(x.options) for x in layers)
        if plans <= MAX_PLANS:
            break
    m = rng.randint(1, 6)
    stage_of_rank, bubble_weight = random_ranks(rng, S)
    if rng.random() < 0.5:
        in_flight = tuple(min(S - s, m) for s in range(S))
    else:
        in_flight = tuple(rng.randint(0, m) for _ in range(S))
    total_bytes = sum(
        x.state_bytes + max(in_flight) * max(o.activation_bytes for o in x.options) for x in layers
    )
    budget = INF
    if rng.random() < 0.85:  # never exactly on a peak: peaks are whole megabytes
        budget = float(int(total_bytes / 1e6 * rng.uniform(0.1, 0.9))) * 1e6 + 0.5e6
    return with_random_links(rng, layers, S, m, in_flight, stage_of_rank, budget, bubble_weight)


def gpt_like(blocks, pp, v, m, budget):
    """Embedding, equal transformer blocks and a head (GPT-3 175B per-device figures at tp 8),
    options none / full checkpoint, interleaved: stage s on rank s % pp."""

    def options(fwd_s, bwd_s, act_bytes, full_act_bytes):
        return (
            LayerOption(name="none", fwd_s=fwd_s, bwd_s=bwd_s, activation_bytes=act_bytes),
            LayerOption(
                name="full", fwd_s=fwd_s, bwd_s=bwd_s + fwd_s, activation_bytes=full_act_bytes
            ),
        )

    block = options(0.0061, 0.0122, 358.6e6, 50.3e6)
    layers = [layer("pre", options(0.0003, 0.0006, 50.3e6, 0.0), 1.26e9, 50.3e6)]
    layers += [layer(f"blocks.{i}", block, 3.62e9, 50.3e6) for i in range(blocks)]
    layers += [layer("post", options(0.0017, 0.0034, 103e6, 50.3e6), 1.26e9, 0.0)]
    S = pp * v
    in_flight = [min(max(2 * pp - 1 - 2 * s, pp), 4 * pp - 2 * s - 1) for s in range(S)]
    return problem(
        layers,
        num_stages=S,
        num_microbatches=m,
        in_flight=in_flight if v == 2 else [min(pp - s, m) for s in range(S)],
        stage_of_rank=tuple(s % pp for s in range(S)),
        memory_budget_bytes=budget,
        p2p_s_per_byte=1 / 12.5e9,
        p2p_latency_s=5e-6,
        bubble_weight=1 / v,
    )
