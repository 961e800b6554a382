"""`m6lit plan`: the placement and memory estimate of a fit config, computed on the meta device.

    m6lit plan --config configs/m6-10t.yaml --gpu_memory_budget 80GB --num_gpus 512

The config is parsed and instantiated by the same LightningCLI as `m6lit fit` (stacked `--config` files, included
base recipes, `--model.config.*` options, the tokenizer's linked vocabulary), with the module built on the meta
device, so nothing is allocated. Budgets, patterns and prefetch come from the config's
`SelectiveOffloadStrategy` unless given here; with an active `PseudoToReal` callback both stages are planned: the
shared (pseudo) model and the delinked (real) one. `--gpus N [--ep E]` adds, per stage, the per-rank memory and
step time of the many-GPU strategies (`m6lit.strategies.parallel_estimate`).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser
from torch import nn

from m6lit.callbacks.pseudo_to_real import PseudoToReal
from m6lit.cli import M6CLI, _strategy_short_name_with_options
from m6lit.model import M6Model
from m6lit.strategies.offload import SelectiveOffloadStrategy
from m6lit.strategies.parallel_estimate import min_gpus_experts_offloaded, parallel_table, plan_offload_ddp
from m6lit.strategies.patterns import resolve_offload
from m6lit.strategies.planner import plan_offload
from m6lit.strategies.sizes import format_bytes, format_count, parse_bytes

#: the plan's own options (besides the fit config's keys), with their help text
PLAN_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "gpu_memory_budget": (Optional[str], None, "e.g. 80GB; default: the config's strategy setting"),
    "host_memory_budget": (Optional[str], None, "e.g. 1TB; default: the config's strategy setting"),
    "offload": (Optional[Union[list[str], str]], None, "module patterns instead of a budget: one, or a list "
                "('[\"model.blocks.[1-2]\", \"*.experts\"]')"),
    "num_gpus": (int, 1, "GPUs the experts are split over (estimate)"),
    "gpus_per_host": (int, 8, "GPUs per host, for the per-host memory line"),
    "micro_batch_tokens": (Optional[int], None, "default: data.batch_size * model.config.max_seq_len"),
    "prefetch": (Optional[int], None, "blocks streamed ahead; default: the config's strategy setting"),
    "optimizer_state_bytes": (int, 8, "8 for AdamW fp32 moments"),
    "gpus": (Optional[int], None, "add the many-GPU table for this many ranks: per-rank memory and step time of ddp, "
             "m6_offload_ddp, m6_fsdp (± CPU offload of the offloaded units) and m6_ep, and the fewest GPUs each "
             "needs for the GPU budget"),
    "ep": (Optional[int], None, "expert-parallel size of m6_ep in that table (default: all GPUs)"),
}


def delink_target(callbacks: list[Any], num_layers: int) -> Optional[int]:
    """Blocks the model has after the last delink of the first active `PseudoToReal` among `callbacks`, else None."""
    for callback in callbacks:
        if isinstance(callback, PseudoToReal) and callback.active:
            return callback.events[-1].num_unique_blocks if callback.events else num_layers
    return None


class PlanCLI(M6CLI):
    """The fit CLI without a subcommand: parses and instantiates the config (model on the meta device, data,
    callbacks, strategy), then prints the plan instead of training."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(args=args, run=False, save_config_callback=None,
                         parser_kwargs={"prog": "m6lit plan", "description": __doc__.split("\n\n")[0]})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        for name, (kind, default, help_text) in PLAN_OPTIONS.items():
            parser.add_argument(f"--{name}", type=kind, default=default, help=help_text)

    def instantiate_classes(self) -> None:
        with torch.device("meta"):  # the model's shapes only: a 10 T-parameter config plans on a laptop
            super().instantiate_classes()

    def plan_options(self) -> dict[str, Any]:
        """The plan's own options as parsed."""
        return {name: self.config.get(name) for name in PLAN_OPTIONS}


def _stage_root(module: LightningModule, num_unique_blocks: Optional[int]) -> nn.Module:
    """`module` as configured, or a module named like it holding the model delinked to `num_unique_blocks`."""
    if num_unique_blocks is None:
        return module
    root = nn.Module()
    with torch.device("meta"):
        root.model = M6Model(module.model.config.replace(num_unique_blocks=num_unique_blocks))
    return root


def print_plan(name: str, module: LightningModule, trainer: Trainer, batch_size: int, options: dict[str, Any]) -> None:
    """Print the placement table of each stage of the configured model (see the module docstring)."""
    strategy = trainer.strategy if isinstance(trainer.strategy, SelectiveOffloadStrategy) else None
    budget = options["gpu_memory_budget"] or (strategy.gpu_memory_budget if strategy else None)
    given = [options["offload"]] if isinstance(options["offload"], str) else options["offload"]
    offload = given if given is not None else (
        strategy.offload if strategy is not None and budget is None else None)
    if budget is None and offload is None:
        raise ValueError("m6lit plan: give --gpu_memory_budget (or --offload patterns), or set them on the config's "
                         "strategy (trainer.strategy: SelectiveOffloadStrategy)")
    host_budget = options["host_memory_budget"] or (strategy.host_memory_budget if strategy else None)
    host_budget = parse_bytes(host_budget) if host_budget else None
    prefetch = options["prefetch"] if options["prefetch"] is not None else (strategy.prefetch if strategy else 1)
    precision = str(trainer.precision)
    config = module.model.config
    tokens = options["micro_batch_tokens"] or batch_size * config.max_seq_len
    num_gpus = options["num_gpus"]
    stages = [("as configured", None)]
    target = delink_target(trainer.callbacks, config.num_layers)
    if target is not None and target != config.num_unique_blocks:
        stages.append((f"after delink to {target} blocks", target))
    for title, blocks in stages:
        root = _stage_root(module, blocks)
        c = root.model.config
        total = sum(p.numel() for p in root.model.parameters())
        print(f"== {name} ({title}): {format_count(total)} parameters, {c.num_layers} layers on "
              f"{c.num_unique_blocks} blocks, d_model {c.d_model}, "
              + (f"{c.num_experts} experts top-{c.top_k} ({c.router})" if c.moe_layers != "none" else "dense")
              + f"; {precision}, {tokens} tokens per micro-batch per GPU, {num_gpus} GPU(s)")
        try:
            plan = plan_offload(root, gpu_memory_budget=budget if offload is None else None, offload=offload,
                                precision=precision, micro_batch_tokens=tokens, prefetch=prefetch,
                                optimizer_state_bytes=options["optimizer_state_bytes"],
                                accumulate_grad_batches=int(trainer.accumulate_grad_batches or 1),
                                host_memory_budget=None, num_gpus=num_gpus)
        except ValueError as err:
            print(f"no plan: {err}")
            _print_parallel(root, options, budget, None, precision, tokens, trainer, explicit=offload is not None)
            continue
        plan.host_memory_budget = host_budget
        print(plan.table())
        if num_gpus > 1 and plan.estimate.offloaded_params:
            per_host = min(options["gpus_per_host"], num_gpus)
            print(f"per host ({per_host} GPUs): {format_bytes(per_host * plan.estimate.host_total)} of host memory, "
                  f"{format_bytes(per_host * plan.estimate.pinned)} pinned")
        if plan.host_memory_budget and plan.estimate.host_total > plan.host_memory_budget:
            print(f"WARNING: host memory per GPU {format_bytes(plan.estimate.host_total)} exceeds host_memory_budget "
                  f"{format_bytes(plan.host_memory_budget)}")
        _print_parallel(root, options, budget, plan.offload, precision, tokens, trainer,
                        explicit=offload is not None)
        print()
    sys.stdout.flush()


def _print_parallel(root: nn.Module, options: dict[str, Any], budget: Any, offload: Optional[list[str]],
                    precision: str, tokens: int, trainer: Trainer, explicit: bool) -> None:
    """The many-GPU table (`--gpus`), then the fewest GPUs for experts split and offloaded. Offloaded units: the
    patterns given, else for `m6_offload_ddp` what the offload planner streams of one full replica for the GPU
    budget (all-reduce buffers included), and for `m6_fsdp+offload` the plan's units or, without a plan, every
    block but the first and the last (the planner's resident minimum)."""
    gpus = options.get("gpus")
    if not gpus:
        return
    blocks = len(root.model.blocks)
    if not offload:
        offload = [f"model.blocks.[1-{blocks - 2}]"] if blocks > 2 else []
    accumulate = int(trainer.accumulate_grad_batches or 1)
    common = dict(precision=precision, micro_batch_tokens=tokens, accumulate_grad_batches=accumulate,
                  optimizer_state_bytes=options["optimizer_state_bytes"])
    replica = offload
    if not explicit and budget is not None:
        try:  # each DDP rank streams its own full replica: plan it for the budget with no experts split
            replica = plan_offload_ddp(root, parse_bytes(budget), gpus, **common)
        except ValueError:
            replica = offload
    print(f"many GPUs: {gpus} GPUs, {tokens} tokens per micro-batch per GPU x {accumulate}; offloaded units "
          f"{_units_text(root, offload)} (m6_offload_ddp: {_units_text(root, replica)}); assumed 400 TFLOP/s, "
          f"50 GB/s per GPU for collectives, 55 GB/s PCIe, 4.26 G params/s host AdamW")
    print(parallel_table(root, gpus, ep=options.get("ep"), offload=offload, offload_ddp=replica,
                         gpu_budget=parse_bytes(budget) if budget is not None else None, **common))
    if budget is None or not any(getattr(m, "num_experts", 0) for m in root.model.blocks.modules()):
        return
    host = options.get("host_memory_budget")
    found = min_gpus_experts_offloaded(root, parse_bytes(budget), parse_bytes(host) if host else None, **common)
    what = ("experts split over N GPUs + offload of what does not fit (the offload planner; no m6lit strategy "
            "combines expert parallelism with offload yet)")
    if found is None:
        print(f"{what}: fits on no power-of-two number of GPUs")
    else:
        n, plan = found
        print(f"{what}: fits {format_bytes(parse_bytes(budget))} per GPU from {n} GPUs"
              + (f" with host memory <= {format_bytes(parse_bytes(host))} per GPU" if host else "")
              + f" ({format_bytes(plan.estimate.gpu_total)} GPU, {format_bytes(plan.estimate.host_total)} host per "
              f"GPU there)")


def _units_text(root: nn.Module, patterns: list[str]) -> str:
    units = resolve_offload(root, patterns) if patterns else []
    if not units:
        return "none"
    return ", ".join(units) if len(units) <= 3 else f"{len(units)} units ({units[0]} ... {units[-1]})"


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of `m6lit plan` (argv without the subcommand)."""
    cli = PlanCLI(_strategy_short_name_with_options(list(sys.argv[1:] if argv is None else argv)))
    configs = cli.config.get("config") or []
    name = str(configs[-1]).rsplit("/", 1)[-1] if configs else "config"
    print_plan(name, cli.model, cli.trainer, int(cli.datamodule.batch_size), cli.plan_options())
