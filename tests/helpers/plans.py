"""Plans written by hand, for tests of what reads a plan (no model, no planner)."""

from autopar.plan import SCHEMA_VERSION, OpSharding, Plan

FINGERPRINT = "ab" * 32


def sample_plan(n_layers: int = 3, **overrides) -> Plan:
    """A hand-written plan of a GPT-like model on dp=2 x tp=2 (no pipeline), `overrides`
    replacing its fields."""
    parameters = {"wte.weight": ["S(0)", "R"], "ln_f.weight": ["R", "R"]}
    for i in range(n_layers):
        parameters[f"blocks.{i}.attn.qkv.weight"] = ["R", "S(0)"]
        parameters[f"blocks.{i}.attn.proj.weight"] = ["R", "S(1)"]
    fields = dict(
        schema_version=SCHEMA_VERSION,
        model="GPT",
        graph_fingerprint=FINGERPRINT,
        cluster={"name": "cpu", "nodes": 1, "devices_per_node": 4},
        mesh={"dp": 2, "tp": 2},
        parameters=parameters,
        inputs={"idx": ["S(0)", "R"]},
        ops={
            "mm": OpSharding(inputs=[["S(0)", "R"], ["R", "S(1)"]], outputs=[["S(0)", "S(1)"]]),
            "mm_1": OpSharding(
                inputs=[["S(0)", "S(1)"], ["R", "S(0)"]], outputs=[["S(0)", "P(sum)"]]
            ),
        },
        predicted={
            "step_time_s": 0.0125,
            "compute_s": 0.01,
            "communication_s": 0.0025,
            "peak_memory_bytes": 3 * 2**30,
        },
        solver={
            "name": "highs",
            "status": "Optimal",
            "gap": 0.0,
            "objective_s": 0.0125,
            "solve_time_s": 0.31,
        },
    )
    fields.update(overrides)
    return Plan(**fields)
