"""Placement strategies: selective CPU offload of chosen layers, streamed just in time.

Importing this package registers the strategy's short name `m6_offload` with Lightning.
"""

from m6lit.strategies.offload import SelectiveOffloadStrategy
from m6lit.strategies.planner import OffloadPlan, plan_offload
from m6lit.strategies.streaming import ParamStreamer

__all__ = ["OffloadPlan", "ParamStreamer", "SelectiveOffloadStrategy", "plan_offload"]
