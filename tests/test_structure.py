"""apply_structure_change: the steps run in order on a real module, one record per change, the returned ParamMap is
the one the optimizer and the strategy saw, strategies that cannot re-plan stop it naming themselves, bad input."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from _fakes import loader, tiny_config
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

from m6lit.model import apply_expert_op
from m6lit.module import M6LitModule
from m6lit.structure import Delink, ExpertChange, apply_structure_change, measure


def _module(**overrides) -> M6LitModule:
    torch.manual_seed(0)
    return M6LitModule(tiny_config(**overrides), warmup_steps=2)


class _Logger:
    def __init__(self) -> None:
        self.rows: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.rows.append((dict(metrics), step))


class _Strategy(SingleDeviceStrategy):
    """Records what the optimizer and the module's hparams held when it was told of the change."""

    def __init__(self, module: M6LitModule, optimizer: torch.optim.Optimizer) -> None:
        super().__init__("cpu")
        self.module, self.optimizer = module, optimizer
        self.calls: list[dict] = []

    def on_parameters_changed(self, param_map) -> None:
        self.calls.append({"param_map": param_map,
                           "held": {id(p) for g in self.optimizer.param_groups for p in g["params"]},
                           "num_unique_blocks": self.module.hparams["config"]["num_unique_blocks"],
                           "overrides": self.module.hparams["config"]["expert_overrides"]})


def _trainer(module: M6LitModule, strategy=None, step: int = 7):
    optimizer = torch.optim.AdamW(module.build_param_groups(), lr=1e-2)
    batch = next(iter(loader()))
    out = module.model(batch)
    out.logits.square().mean().backward()
    optimizer.step()
    strategy = strategy or _Strategy(module, optimizer)
    logger = _Logger()
    trainer = SimpleNamespace(global_step=step, optimizers=[optimizer], strategy=strategy, loggers=[logger])
    return trainer, optimizer, logger, batch


def test_delink_runs_every_step_in_order_and_returns_the_param_map(caplog: pytest.LogCaptureFixture) -> None:
    module = _module(num_unique_blocks=2)
    trainer, optimizer, logger, batch = _trainer(module)
    old = {id(p) for p in module.model.blocks.parameters()}
    loss_before = measure(module, batch).loss
    params_before = module.model.num_parameters(unique=True)
    history: list[dict] = []
    with caplog.at_level(logging.INFO):
        param_map = apply_structure_change(trainer, module, Delink(4), batch=batch, optimizer_state="copy",
                                           history=history)
    assert len(module.model.blocks) == 4 and module.hparams["config"]["num_unique_blocks"] == 4
    (call,) = trainer.strategy.calls
    assert call["param_map"] is param_map
    assert call["num_unique_blocks"] == 4  # hparams were updated before the strategy heard of it
    assert call["held"] == {id(p) for p in module.parameters()}  # ... and the optimizer already rewritten
    assert not call["held"] & old
    assert {id(link.new) for link in param_map} == {id(p) for p in module.model.blocks.parameters()}
    assert all(link.new in optimizer.state and link.sources[0] not in optimizer.state for link in param_map)
    ((record, step),) = logger.rows
    assert step == 7 and history == [record]
    assert list(record) == ["p2r/step", "p2r/num_unique_blocks", "p2r/unique_params_before",
                            "p2r/unique_params_after", "p2r/loss_before", "p2r/loss_after"]
    assert record["p2r/step"] == 7.0 and record["p2r/num_unique_blocks"] == 4.0
    assert record["p2r/unique_params_before"] == params_before
    assert record["p2r/unique_params_after"] == module.model.num_parameters(unique=True)
    assert record["p2r/loss_before"] == loss_before == record["p2r/loss_after"]  # delink keeps the function
    assert "PseudoToReal: delinked at step 7: 2 → 4 unique blocks; parameters" in caplog.text
    assert module.training  # measuring restored the training flag


def test_expert_change_matches_the_pure_op_and_feeds_load_weights_from_the_batch() -> None:
    module = _module(top_k=1)
    twin = _module(top_k=1)
    trainer, _, logger, batch = _trainer(module)
    twin.model.load_state_dict(module.model.state_dict())
    apply_structure_change(trainer, module, ExpertChange("split", 2, generator=torch.Generator().manual_seed(3),
                                                         noise=0.1), batch=batch, log_loss=False)
    apply_expert_op(twin.model, "split", 2, noise=0.1, generator=torch.Generator().manual_seed(3))
    before = measure(twin, batch)
    history: list[dict] = []
    apply_structure_change(trainer, module, ExpertChange("merge", 2, weights="load"), batch=batch, log_loss=False,
                           history=history)
    apply_expert_op(twin.model, "merge", 2, weights="load", loads=before.loads)
    for (name, a), b in zip(module.model.state_dict().items(), twin.model.state_dict().values()):
        assert torch.equal(a, b), name
    (record,) = history
    assert record["op"] == "merge" and record["blocks"] == [1, 3]
    assert record["shapes_before"] == {b: {"num_experts": 8, "top_k": 1, "expert_d_ff": 64, "segments": 1}
                                       for b in (1, 3)}
    assert record["shapes_after"] == {b: {"num_experts": 4, "top_k": 1, "expert_d_ff": 64, "segments": 1}
                                      for b in (1, 3)}
    assert math.isnan(record["experts/loss_after"])  # log_loss=False: no second forward
    assert record["experts/loss_before"] == before.loss  # measured anyway: the merge needed the loads
    assert [r["experts/num_experts"] for r, _ in logger.rows] == [8.0, 4.0]
    assert module.hparams["config"]["expert_overrides"] is None


def test_a_sharding_strategy_prepares_before_the_op_and_a_merge_uses_every_rank_s_loads() -> None:
    """`before_parameters_change` sees the op's blocks before anything changed; on several ranks the load-weighted
    merge uses the loads summed over the ranks (here a fake reduce adds another rank's counts)."""
    module = _module(top_k=1)
    twin = _module(top_k=1)
    other = {layer: torch.arange(4.0) * 5 for layer in (1, 3)}
    seen: list = []

    class _Sharded(_Strategy):
        def before_parameters_change(self, model, op) -> None:
            seen.append((op.blocks(model), op.shapes_after(model)[1].num_experts, model.blocks[1].ffn.num_experts))

        def reduce(self, tensor, reduce_op="mean"):
            seen.append(reduce_op)
            return tensor + other[1]

    trainer, optimizer, _, batch = _trainer(module)
    twin.model.load_state_dict(module.model.state_dict())
    trainer.strategy = _Sharded(module, optimizer)
    trainer.world_size = 2
    loads = measure(twin, batch).loads
    apply_structure_change(trainer, module, ExpertChange("merge", 2, weights="load", how="average"), batch=batch,
                           log_loss=False)
    apply_expert_op(twin.model, "merge", 2, weights="load", how="average",
                    loads={k: v + other[1] for k, v in loads.items()})
    assert seen == ["sum", "sum", ([1, 3], 2, 4)]
    for (name, a), b in zip(module.model.state_dict().items(), twin.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_strategy_that_cannot_replan_stops_the_change_naming_itself_and_the_step() -> None:
    module = _module(num_unique_blocks=2)
    trainer, _, logger, batch = _trainer(module, strategy=FSDPStrategy(), step=11)
    with pytest.raises(RuntimeError, match=r"FSDPStrategy cannot apply a structural change \(delink of \d+ "
                                           r"parameters .*\) at global step 11"):
        apply_structure_change(trainer, module, Delink(4), batch=batch)
    assert logger.rows == []  # nothing was logged as done


def test_bad_input_is_named() -> None:
    module = _module(num_unique_blocks=2)
    trainer, _, _, batch = _trainer(module)
    with pytest.raises(ValueError, match="optimizer_state='moments': must be one of"):
        apply_structure_change(trainer, module, Delink(4), batch=batch, optimizer_state="moments")
    with pytest.raises(ValueError, match=r"PseudoToReal: measuring the change needs the current batch"):
        apply_structure_change(trainer, module, Delink(4))
    with pytest.raises(ValueError, match=r"ExpertSplitMerge: measuring the change needs the current batch"):
        apply_structure_change(trainer, module, ExpertChange("merge", 2, weights="load"), log_loss=False)
    assert len(module.model.blocks) == 2 and trainer.strategy.calls == []  # refused before anything changed


def test_the_transaction_draws_no_random_numbers() -> None:
    module = _module(num_unique_blocks=1, moe_layers="all")
    trainer, _, _, batch = _trainer(module)
    torch.manual_seed(9)
    apply_structure_change(trainer, module, Delink(2), batch=batch)
    apply_structure_change(trainer, module, ExpertChange("segment", 2), batch=batch)
    drawn = torch.rand(3)
    torch.manual_seed(9)
    assert torch.equal(drawn, torch.rand(3))
    assert len(module.model.blocks) == 2 and [b.ffn.num_experts for b in module.model.blocks] == [8, 8]
