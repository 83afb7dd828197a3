"""Planning: turn a dataset fingerprint into a plan (patch sizes, spacings, networks, batch sizes)."""

from autoseg.planning.planner import PLANNERS, Planner, plan_dataset, register_planner

__all__ = ["PLANNERS", "Planner", "plan_dataset", "register_planner"]
