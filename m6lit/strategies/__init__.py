"""Placement strategies: selective CPU offload of chosen layers, streamed just in time; FSDP2 and expert
parallelism for many GPUs.

Importing this package registers the short names `m6_offload`, `m6_offload_ddp`, `m6_fsdp` and `m6_ep` with
Lightning.
"""

from m6lit.strategies.offload import SelectiveOffloadStrategy
from m6lit.strategies.offload_ddp import DDPOffloadStrategy
from m6lit.strategies.parallel import ExpertParallelStrategy, FSDP2Strategy
from m6lit.strategies.planner import OffloadPlan, plan_offload
from m6lit.strategies.streaming import ParamStreamer

__all__ = ["DDPOffloadStrategy", "ExpertParallelStrategy", "FSDP2Strategy", "OffloadPlan", "ParamStreamer", "SelectiveOffloadStrategy", "plan_offload"]
