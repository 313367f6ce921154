"""A hand configuration (Megatron-LM / torchtitan style) as a scored candidate, so that it can
be simulated and compared with what the search finds by the same cost model."""

from __future__ import annotations

from autopar import parallelism
from autopar.batches import microbatch_inputs
from autopar.cluster import Cluster
from autopar.errors import MeshError
from autopar.planning.candidate import Candidate, evaluate, even_stages
from autopar.planning.layer_costs import layer_costs, prepare, solve_layers
from autopar.planning.profile import TrainingPrecision
from autopar.schedules import get_schedule


def hand_configuration(trace_fn, example_inputs, cluster: Cluster, mesh: dict[str, int], *,
                       batch: int, microbatch_size: int, layers: list[str], checkpoint: str,
                       schedule: str, flavour: str, dp_shard: int | None,
                       precision: TrainingPrecision, solver: str,
                       sequence_parallel: bool = False) -> Candidate:
    """The candidate of a fixed mesh (every searched axis present), `microbatch_size` samples
    per data-parallel rank, `layers` cut evenly into pp x v stages, `checkpoint` ("none",
    "full", "selective") for every block that offers it, and the op shardings the intra-op ILP
    finds on the stage mesh for one microbatch (Megatron's column/row split is what it finds
    for GPT blocks); with `sequence_parallel`, the residual stream's ops split along the sequence
    over tp (`autopar.planning.sequence_parallel`). Scored by `candidate.evaluate`, as the
    search scores its own."""
    pp, dp = mesh[parallelism.PIPELINE], parallelism.batch_ranks(mesh)
    sched = get_schedule(schedule)
    v = sched.default_v(None) if pp > 1 else 1
    mb = microbatch_size * dp
    m = batch // mb
    if pp > 1:
        try:
            sched.check(pp, m, v)
        except ValueError as e:
            raise MeshError(f"{e} (batch {batch} / ({dp} data-parallel ranks x microbatch {microbatch_size}) "
                            f"= {m} microbatches)") from None
    stand, profiles = prepare(trace_fn(microbatch_inputs(example_inputs, mb)))
    sub_mesh = parallelism.intra_op_mesh(mesh)
    solved = solve_layers(stand, profiles, cluster, sub_mesh, precision=precision, solver=solver,
                          sequence_parallel="require" if sequence_parallel else "off")
    costs = layer_costs(stand, profiles, cluster, sub_mesh, flavour, precision=precision,
                        solved=solved, dp_shard=dp_shard)
    options = {x.name: checkpoint if checkpoint in [o.name for o in x.options] else "none"
               for x in costs.layers}
    c = Candidate(
        mesh=dict(mesh), microbatch_size=mb, num_microbatches=m,
        schedule=sched.name if pp > 1 else "1F1B", v=v, flavour=flavour,
        stages=even_stages(layers, pp * v), options=options, costs=costs,
    )
    return evaluate(c, cluster)
