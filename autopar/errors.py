"""Errors autopar raises for problems a user can fix, and the warnings it gives.

Every message says what was wrong, where (module FQN, op, file, field) and what to do about it.
Catching `AutoparError` catches them all; internal bugs stay ordinary exceptions.
"""


class AutoparError(Exception):
    """Base class: a problem with the user's model, cluster, options or plan."""


class ClusterSpecError(AutoparError, ValueError):
    """A cluster or device description is invalid (the message names the field)."""


class TraceError(AutoparError):
    """The model could not be exported to a graph (the message names the module and the fix)."""


class MeshError(AutoparError, ValueError):
    """A requested mesh does not match the world size or the model's shapes."""


class InfeasibleError(AutoparError):
    """No plan fits the memory budget; carries the smallest peak found."""

    def __init__(self, message: str, *, min_peak_bytes: float | None = None,
                 budget_bytes: float | None = None):
        super().__init__(message)
        self.min_peak_bytes = min_peak_bytes
        self.budget_bytes = budget_bytes


class PlanMismatchError(AutoparError, ValueError):
    """A saved plan was made for another model, cluster or world size."""


class NoShardingRuleWarning(UserWarning):
    """An op has no sharding rule, so it runs whole on every rank (`autopar.register_rule`)."""
