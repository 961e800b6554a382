"""DDPOffloadStrategy: selective CPU offload on many GPUs, in data-parallel form (short name `m6_offload_ddp`).

Every rank is one process with one device and a full replica, placed and streamed exactly as
`SelectiveOffloadStrategy` places and streams it (the same patterns or budget plan, the same host engine). Data
parallelism is added with Lightning's and PyTorch's own machinery:

- processes and groups: Lightning's `DDPStrategy` (its launchers for `trainer.devices`/`num_nodes`, torchrun and
  SLURM through the cluster environment, `init_process_group`, the `DistributedSampler` from
  `distributed_sampler_kwargs`, `barrier`/`broadcast`/`reduce`);
- resident parameters: PyTorch's `DistributedDataParallel` with every streamed parameter ignored, so its reducer
  averages their gradients in buckets overlapped with backward (and skips the sync on accumulating micro-batches,
  as under plain DDP). The reducer cannot take the streamed parameters: their `.data` moves between host and device
  around each use, and their gradients must be averaged before they leave the device;
- streamed parameters: as autograd finishes each gradient, `torch.distributed.all_reduce(async_op=True)` sums it
  over the ranks on a process group of its own (its order never interleaves with DDP's buckets), and the streamer's
  copy stream waits for that work, divides by the world size, takes the norm and copies the average to the host
  while the compute stream goes on with backward (on the CPU path, gloo, the wait blocks). `reduce_dtype: float32`
  (default) sums bf16 stream gradients in fp32 and rounds the average back; `grad` sums in the gradient's dtype;
- the host engine steps the averaged gradients, so `total_grad_norm()` (per-parameter norms of averaged gradients)
  is the global norm and clipping is the one DDP would do;
- replicas start equal (rank 0's parameters and buffers are broadcast before placement); every rank holds the full
  state, so rank 0 alone writes checkpoints and every rank resumes from the same file.

Host memory is per process: N ranks on one node hold N copies of the offloaded state, and the engine threads default
to the node's cores split between the local ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from m6lit.strategies.offload import SelectiveOffloadStrategy

REDUCE_DTYPES = ("float32", "grad")


def _rank_property(name: str) -> property:
    """ParallelStrategy's rank property (read from the cluster environment), with a setter that ignores the values
    `SingleDeviceStrategy.__init__` writes for its one process."""
    return property(getattr(ParallelStrategy, name).fget, lambda self, value: None)


class DDPOffloadStrategy(SelectiveOffloadStrategy, DDPStrategy):
    """Data-parallel selective offload: each rank streams its replica; gradients are averaged on the device.

    Args:
        offload, gpu_memory_budget, host_memory_budget, prefetch, pin_memory, offload_optimizer, micro_batch_tokens,
            optimizer_overlap, delay_warmup_steps, engine_threads, engine: as `SelectiveOffloadStrategy`, per rank
            (`engine_threads` defaults to the host's cores divided by the local ranks, less one).
        reduce_dtype: `float32` (default): streamed gradients are summed over ranks in fp32 (bf16 ones upcast for
            the sum, the average rounded back); `grad`: in the gradient's own dtype (half the bytes for bf16).
        process_group_backend, timeout, start_method, parallel_devices, cluster_environment: as Lightning's
            `DDPStrategy`.
        **ddp_kwargs: `DistributedDataParallel` arguments for the resident parameters (`bucket_cap_mb`, ...).
    """

    strategy_name = "m6_offload_ddp"

    # the process-group side comes from DDPStrategy, not from SingleDeviceStrategy's one-process versions
    global_rank = _rank_property("global_rank")
    local_rank = _rank_property("local_rank")
    world_size = _rank_property("world_size")
    is_global_zero = ParallelStrategy.is_global_zero
    all_gather = ParallelStrategy.all_gather
    reduce = DDPStrategy.reduce
    barrier = DDPStrategy.barrier
    broadcast = DDPStrategy.broadcast
    _configure_launcher = DDPStrategy._configure_launcher

    def __init__(self, offload: list[str] | None = None, gpu_memory_budget: int | str | None = None,
                 host_memory_budget: int | str | None = None, prefetch: int = 1, pin_memory: bool = True,
                 offload_optimizer: bool = True, micro_batch_tokens: int | None = None,
                 optimizer_overlap: str = "exact", delay_warmup_steps: int = 10, engine_threads: int | None = None,
                 engine: str = "thread", reduce_dtype: str = "float32", accelerator: Any = None,
                 parallel_devices: list[torch.device] | None = None, cluster_environment: Any = None,
                 checkpoint_io: Any = None, precision_plugin: Any = None, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout, start_method: str = "popen",
                 **ddp_kwargs: Any) -> None:
        if "gpu_step_window" in ddp_kwargs:
            raise ValueError("DDPOffloadStrategy does not take gpu_step_window yet: every offloaded unit steps on the "
                             "host engine (use SelectiveOffloadStrategy on one device for the GPU step window)")
        if reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"DDPOffloadStrategy.reduce_dtype={reduce_dtype!r}: choose one of {REDUCE_DTYPES}")
        super().__init__(offload=offload, gpu_memory_budget=gpu_memory_budget, host_memory_budget=host_memory_budget,
                         prefetch=prefetch, pin_memory=pin_memory, offload_optimizer=offload_optimizer,
                         micro_batch_tokens=micro_batch_tokens, optimizer_overlap=optimizer_overlap,
                         delay_warmup_steps=delay_warmup_steps, engine_threads=engine_threads, engine=engine,
                         accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        self.parallel_devices = parallel_devices
        self.cluster_environment = cluster_environment
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._start_method = start_method
        self._ddp_kwargs = ddp_kwargs
        self.reduce_dtype = reduce_dtype
        self._grad_group: Any = None

    @property
    def root_device(self) -> torch.device:
        return DDPStrategy.root_device.fget(self)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ processes and placement
    def setup_environment(self) -> None:
        """Lightning's DDP process group, plus a second group for the streamed gradients' all-reduces."""
        super().setup_environment()
        self._grad_group = dist.new_group() if self.world_size > 1 else None

    def setup(self, trainer: Trainer) -> None:
        if self.engine_threads is None:
            self.engine_threads = max(1, (os.cpu_count() or 1) // max(1, self.num_processes) - 1)
        super().setup(trainer)

    def model_to_device(self) -> None:
        """Broadcast rank 0's parameters and buffers (as DDP does), then place and stream the replica."""
        module = self.lightning_module
        assert module is not None
        self._broadcast_from_rank0(module)
        super().model_to_device()

    def _broadcast_from_rank0(self, module: nn.Module) -> None:
        if self.world_size < 2:
            return
        device = self.root_device if dist.get_backend() == "nccl" else torch.device("cpu")
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                data = tensor.data
                moved = data.to(device)  # NCCL broadcasts device tensors; a host model goes through a device copy
                dist.broadcast(moved, src=0)
                if moved is not data:
                    data.copy_(moved)

    def _place(self, module: LightningModule) -> None:
        super()._place(module)
        if self.streamer is not None:
            self.streamer.reduce_grad = self._reduce_grad if self.world_size > 1 else None

    def _setup_model(self, model: nn.Module) -> nn.Module:
        """DDP over the resident parameters only (the streamed ones are ignored); no wrapper when none trains."""
        module = self.lightning_module
        streamer = self.streamer
        assert module is not None
        streamed = [n for n, p in module.named_parameters() if streamer is not None and streamer.is_streamed(p)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, streamed)
        ignored = set(streamed)
        if not any(p.requires_grad for n, p in module.named_parameters() if n not in ignored):
            return model
        return super()._setup_model(model)

    def on_parameters_changed(self, param_map: Any = None) -> None:
        """After a delink or expert split: re-plan and place (as the single-device strategy), then rebuild DDP over
        the resident parameters of the new structure."""
        self.model = self.lightning_module
        super().on_parameters_changed(param_map)
        self.model = self._setup_model(self.model)

    # ------------------------------------------------------------------ gradients
    def _reduce_grad(self, grad: Tensor) -> Callable[[], Tensor]:
        """Start the sum of a streamed gradient over the ranks; the returned function waits for it (on the stream
        current when it is called) and leaves the average in `grad`."""
        buf = grad.float() if self.reduce_dtype == "float32" and grad.dtype != torch.float32 else grad
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._grad_group, async_op=True)
        world = self.world_size

        def finish() -> Tensor:
            work.wait()
            buf.div_(world)
            if buf is not grad:
                grad.copy_(buf)
                if buf.is_cuda:
                    buf.record_stream(torch.cuda.current_stream(buf.device))
            return grad
        return finish

    def post_backward(self, closure_loss: Tensor) -> None:
        """Every streamed parameter that trains must have had its gradient averaged in this backward: the ranks issue
        their all-reduces in the order autograd finishes the gradients, so one that a rank skips would pair the other
        ranks' collectives with the wrong tensors (the streamed counterpart of DDP's unused-parameter error)."""
        super().post_backward(closure_loss)
        streamer = self.streamer
        if streamer is None or streamer.reduce_grad is None:
            return
        missing = [f"{u.name}.{g.names[i]}" for u in streamer.units for g in u.groups
                   for i, p in enumerate(g.params) if id(p) in u.pending]
        if missing:
            raise RuntimeError(f"DDPOffloadStrategy: {len(missing)} streamed parameters got no gradient in this "
                               f"backward ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); every "
                               f"rank must average the same gradients. Keep them resident (out of `offload`) with "
                               f"find_unused_parameters: true, or freeze them (requires_grad=False)")

    def total_grad_norm(self) -> Tensor | None:
        """The global gradient norm: the streamed gradients' norms were taken from their averages on the copy
        stream, so the compute stream waits for it first."""
        streamer = self.streamer
        if self._norm_cache is None and streamer is not None and streamer.cuda:
            torch.cuda.current_stream(streamer.device).wait_stream(streamer.d2h_stream)
        return super().total_grad_norm()

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        if isinstance(self.model, DistributedDataParallel):
            self.model = self.lightning_module
        super().teardown()
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()


StrategyRegistry.register(DDPOffloadStrategy.strategy_name, DDPOffloadStrategy,
                          description="m6lit selective CPU offload on many devices: each rank streams its replica, "
                                      "gradients are all-reduced on the device", override=True)

__all__ = ["DDPOffloadStrategy", "REDUCE_DTYPES"]
