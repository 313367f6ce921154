"""autopar: plan how to spread a PyTorch model's training over a cluster, and run that plan.

    autopar.plan(model, cluster, example_inputs, ...)          -> Plan      (offline, no GPU)
    autopar.simulate(plan)                                      -> Report    (predictions)
    autopar.manual_plan(model, cluster, inputs, tp=, pp=, dp=, ...) -> Plan  (hand configs)
    autopar.autoparallelize(model, cluster, example_inputs)    -> ParallelModel (in torchrun)
    autopar.optimizer(pm, torch.optim.AdamW, lr=...)            -> its optimizer (fp32 masters
                                                                   under "bf16-mixed")
    autopar.save(path, pm, opt, extra=) / autopar.load(path, pm, opt) -> extra   (DCP; any plan)
    autopar.full_state_dict(pm)                                 -> plain weights, every rank
    autopar.register_rule(op, fn)                               -> a sharding rule for an op
    autopar.sweep(models, clusters, options)                    -> rows (plain dicts)
    autopar.sweep.to_csv(rows, path), .to_dataframe(rows), .plot(rows, x=, y=, path=)
"""

from autopar.api import autoparallelize, manual_plan, plan
from autopar.cluster import Cluster
from autopar.errors import (
    AutoparError,
    ClusterSpecError,
    InfeasibleError,
    MeshError,
    NoShardingRuleWarning,
    PlanMismatchError,
    TraceError,
)
from autopar.plan import Plan
from autopar.planning.op_rules import register_rule
from autopar.planning.training_precision import TrainingPrecision
from autopar.runtime.checkpoint import full_state_dict, load, load_state_dict, save, state_dict
from autopar.runtime.optim import optimizer
from autopar.runtime.parallel_model import ParallelModel
from autopar.simulate import Report, simulate
from autopar.sweep import sweep

__all__ = [
    "AutoparError",
    "Cluster",
    "ClusterSpecError",
    "InfeasibleError",
    "MeshError",
    "NoShardingRuleWarning",
    "ParallelModel",
    "Plan",
    "Report",
    "PlanMismatchError",
    "TraceError",
    "TrainingPrecision",
    "autoparallelize",
    "full_state_dict",
    "load",
    "load_state_dict",
    "manual_plan",
    "optimizer",
    "plan",
    "register_rule",
    "save",
    "simulate",
    "state_dict",
    "sweep",
]
