"""M6LitModule: parameter groups, LR schedule, learning, resume equivalence, non-finite guards."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from _fakes import fit, tiny_config

from m6lit.data.datamodule import ImageTextDataModule
from m6lit.data.sources import SourceSpec
from m6lit.data.tasks import collate
from m6lit.model import M6Config
from m6lit.module import M6LitModule, build_param_groups, warmup_cosine


def _module(**overrides) -> M6LitModule:
    torch.manual_seed(0)
    return M6LitModule(tiny_config(**overrides), warmup_steps=2)


def test_param_groups_cover_every_parameter_once_and_skip_decay_on_norms_and_embeddings() -> None:
    module = _module()
    groups = build_param_groups(module.model)
    decay, no_decay = groups
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(module.model.parameters()))
    names_no_decay = set(no_decay["param_names"])
    assert {"embed.tokens.weight", "embed.text_pos.weight", "embed.patches.pos", "norm.weight",
            "blocks.0.attn_norm.weight"} <= names_no_decay
    assert "blocks.0.attn.qkv.weight" in decay["param_names"]
    assert "blocks.1.ffn.experts.w_gate" in decay["param_names"]
    assert [n for n in decay["param_names"] if "norm" in n or "embed.tokens" in n] == []


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_training_lowers_the_loss_and_logs_lr_schedule() -> None:
    torch.manual_seed(0)
    module = M6LitModule(tiny_config(), warmup_steps=2, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    trainer, rec = fit(module, 30, data_size=128)
    losses = [loss for _, loss in rec.rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert math.isfinite(float(trainer.callback_metrics["train/grad_norm"]))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(3e-3 * warmup_cosine(30, 2, 30, 0.1))


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    _, full = fit(_module(), 8, dirpath=tmp_path / "full")
    fit(_module(), 8, dirpath=tmp_path / "part", stop=3)
    _, resumed = fit(_module(), 8, dirpath=tmp_path / "resumed", ckpt_path=str(tmp_path / "part" / "last.ckpt"))
    assert resumed.rows == full.rows[3:]


class _Poison(L.Callback):
    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.where == "input" and trainer.global_step == self.step:
            batch["pixel_values"].fill_(float("nan"))

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.where == "grad" and trainer.global_step == self.step:
            pl_module.model.blocks[2].attn.qkv.weight.grad.fill_(float("inf"))


@pytest.mark.parametrize("where,message,log_every", [
    # on a logging step the loss flag is read before the backward: the loss is named
    ("input", "non-finite training loss .* at global step 3", 1),
    # between logging steps the loss flag is not read; the non-finite gradients it causes stop the step
    ("input", r"non-finite gradient \(first in .*\) at global step 3", 50),
    ("grad", r"non-finite gradient \(first in model.blocks.2.attn.qkv.weight\) at global step 3", 50)])
def test_non_finite_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path, where: str,
                                                                            message: str, log_every: int) -> None:
    with pytest.raises(FloatingPointError, match=message):
        fit(_module(), 10, callbacks=[_Poison(3, where)], dirpath=tmp_path, log_every_n_steps=log_every)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_non_finite_loss_flag_is_read_before_a_checkpoint_is_written(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any gradient guard and between logging steps, the device flag still stops the run at the next
    checkpoint write, naming the step of the bad loss, and the last checkpoint on disk stays the good one."""
    module = _module()
    monkeypatch.setattr(module, "on_before_optimizer_step", lambda optimizer: None)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at global step 3"):
        fit(module, 10, callbacks=[_Poison(3, "input")], dirpath=tmp_path, log_every_n_steps=50)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "step=4.ckpt").exists()


class _Snapshot(L.Callback):
    """Parameters after every optimizer step."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def test_fused_adamw_skips_a_non_finite_step_on_the_device_and_names_it_later(tmp_path: Path) -> None:
    """With a fused AdamW the gradient guard reads nothing on the host: the bad step's update is skipped by the
    optimizer itself (found_inf), training goes on to the next read of the flags (here the checkpoint write after
    that step), which names the step; no parameter ever holds a non-finite value."""
    torch.manual_seed(0)
    module = M6LitModule(tiny_config(), warmup_steps=2,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True))
    snapshot = _Snapshot()
    with pytest.raises(FloatingPointError, match="non-finite gradient at global step 3; the optimizer skipped"):
        fit(module, 10, callbacks=[_Poison(3, "grad"), snapshot], dirpath=tmp_path, log_every_n_steps=50)
    assert sorted(snapshot.after) == [1, 2, 3, 4]
    for name, value in snapshot.after[4].items():  # the update of step 3 was not applied
        assert torch.equal(value, snapshot.after[3][name]), name
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_config_dict_hparams_rebuild_from_checkpoint(tmp_path: Path) -> None:
    module = _module(num_unique_blocks=2)
    fit(module, 1, dirpath=tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert isinstance(ckpt["hyper_parameters"]["config"], dict)
    loaded = M6LitModule.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert len(loaded.model.blocks) == 2
    for (n1, p1), (n2, p2) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        M6LitModule(tiny_config(), warmup_steps=-1)
    with pytest.raises(ValueError, match="min_lr_ratio=2"):
        M6LitModule(tiny_config(), min_lr_ratio=2)
    with pytest.raises(ValueError, match="unknown key"):
        M6LitModule({"d_model": 32, "colour": "red"})


def test_throughput_metrics_follow_host_counts_and_the_flops_formula() -> None:
    from m6lit.model.flops import training_flops

    module = M6LitModule(tiny_config(), warmup_steps=2, peak_flops=1e9)
    trainer, _ = fit(module, 4, log_every_n_steps=1)
    m = trainer.callback_metrics
    tokens, samples, mfu = (float(m[k]) for k in ("train/tokens_per_sec", "train/samples_per_sec", "train/mfu"))
    assert tokens > 0 and samples > 0 and float(m["train/first_step_sec"]) > 0
    # ContractBatches: 4 rows of 12 text tokens + 4 image patches
    assert tokens / samples == pytest.approx(16.0)
    per_batch = training_flops(module.config, text_positions=4 * 12, image_positions=4 * 4, seq_len=16)
    assert mfu * 1e9 == pytest.approx(per_batch * samples / 4, rel=1e-5)
    assert {"train/tokens_per_sec", "train/mfu", "lr"} <= set(trainer.progress_bar_metrics)
    assert m["train/tokens_per_sec"].device.type == "cpu"  # host values: logging them moves nothing


def test_no_mfu_without_a_known_peak_on_the_cpu() -> None:
    trainer, _ = fit(_module(), 2, log_every_n_steps=1)
    assert "train/tokens_per_sec" in trainer.callback_metrics and "train/mfu" not in trainer.callback_metrics


def test_chunked_loss_trains_like_the_plain_loss() -> None:
    _, plain = fit(_module(), 3)
    torch.manual_seed(0)
    _, chunked = fit(M6LitModule(tiny_config(), warmup_steps=2, loss_chunk_tokens=7), 3)
    assert [s for s, _ in chunked.rows] == [s for s, _ in plain.rows]
    for (_, a), (_, b) in zip(chunked.rows, plain.rows):
        assert a == pytest.approx(b, rel=1e-5)


def test_compile_blocks_flag_compiles_every_block() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = M6LitModule(tiny_config(), warmup_steps=2, compile_blocks={"backend": "aot_eager"})
    _, compiled = fit(module, 2)
    assert all(b._compiled_call_impl is not None for b in module.model.blocks)
    _, eager = fit(_module(), 2)
    for (_, a), (_, b) in zip(compiled.rows, eager.rows):
        assert a == pytest.approx(b, rel=1e-4)


def test_token_ids_are_checked_on_the_host_batch() -> None:
    module = _module()
    batch = {"input_ids": torch.tensor([[3, 64]]), "attention_mask": torch.ones(1, 2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"ids outside \[0, vocab_size=64\) \(min 3, max 64\)"):
        module.on_before_batch_transfer(batch, 0)
    batch["input_ids"] = torch.tensor([[3, 63]])
    assert module.on_before_batch_transfer(batch, 0) is batch
    assert module._host_counts == (1, 2, 0, 2)
    with pytest.raises(ValueError, match="loss_chunk_tokens=0"):
        M6LitModule(tiny_config(), loss_chunk_tokens=0)
    with pytest.raises(ValueError, match="peak_flops=0"):
        M6LitModule(tiny_config(), peak_flops=0)


def test_fully_skipped_batch_gives_a_graph_connected_zero_loss_on_several_devices() -> None:
    from types import SimpleNamespace

    module = M6LitModule(tiny_config())
    empty = {"input_ids": torch.zeros(0, 0, dtype=torch.long), "attention_mask": torch.zeros(0, 0, dtype=torch.bool),
             "labels": torch.zeros(0, 0, dtype=torch.long), "prefix_len": torch.zeros(0, dtype=torch.long)}
    assert module.training_step(empty, 0) is None  # one device: no optimizer step at all
    module._trainer = SimpleNamespace(world_size=2)
    loss = module.training_step(empty, 0)
    assert loss is not None and float(loss) == 0.0
    loss.backward()  # every trainable parameter joins the (DDP) gradient all-reduce, with a zero gradient
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ generation
# Greedy tokens of m6lit's former own decoder (M6Model.generate: right padding, its own KV cache), recorded on the
# tiny seeded model and prompts below before it was replaced by transformers' generate through the HF wrapper.
# They pin that the one generation path continues the demo's prompts exactly as before.
GREEDY_BEFORE = [
    [103, 186, 372, 47, 47, 47, 67, 327, 217, 214, 208, 70, 163, 229, 198, 70, 150, 379, 115, 198, 198, 212, 203, 253],
    [61, 193, 251, 47, 47, 47, 67, 327, 217, 133, 52, 313, 142, 229, 198, 70, 150, 379, 115, 198, 198, 212, 203, 253],
    [103, 186, 163, 47, 47, 47, 67, 327, 217, 214, 208, 70, 163, 229, 198, 70, 150, 379, 115, 198, 198, 212, 203, 128],
    [222, 186, 163, 105, 105, 23, 67, 327, 217, 133, 52, 313, 142, 229, 198, 70, 150, 379, 115, 198, 198, 256, 67, 314],
    [222, 250, 70, 163, 229, 198, 70, 150, 379, 115, 198, 198, 212, 203, 253, 201, 201, 148, 238, 260, 164, 216, 116, 116],
    [62, 104, 214, 245, 245, 87, 303, 87, 303, 333, 118, 226, 226, 112, 43, 232, 112, 142, 120, 317, 143, 191, 233, 56],
    [61, 186, 163, 105, 105, 23, 67, 327, 217, 133, 52, 313, 379, 229, 198, 143, 150, 379, 115, 198, 198, 212, 203, 252],
]
GREEDY_WITH_IMAGE_VOCAB_BEFORE = [
    [275, 275, 215, 276, 173, 196, 115, 238, 158, 10, 196, 180, 203, 46, 216, 330, 348, 0, 253, 115, 116, 354, 210, 84],
    [125, 34, 215, 276, 173, 216, 216, 216, 53, 10, 196, 180, 203, 46, 216, 330, 173, 0, 253, 115, 116, 354, 210, 84],
    [216, 216, 215, 276, 210, 216, 115, 308, 308, 10, 196, 180, 203, 46, 216, 330, 348, 0, 253, 115, 116, 354, 210, 84],
    [216, 216, 215, 276, 210, 216, 115, 238, 158, 10, 196, 180, 203, 46, 216, 330, 348, 0, 253, 115, 116, 354, 210, 84],
    [10, 196, 180, 203, 46, 216, 330, 173, 0, 253, 115, 116, 354, 210, 84, 218, 150, 125, 260, 279, 341, 276, 337, 233],
    [115, 102, 102, 190, 98, 105, 243, 257, 106, 106, 228, 127, 0, 74, 99, 228, 101, 116, 122, 122, 216, 138, 359, 267],
    [73, 45, 215, 276, 173, 196, 115, 340, 158, 10, 196, 180, 203, 46, 216, 330, 173, 0, 253, 115, 116, 354, 210, 84],
]
GREEDY_STOPPING_AT_198_BEFORE = [
    [103, 186, 372, 47, 47, 47, 67, 327, 217, 214, 208, 70, 163, 229, 198, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [61, 193, 251, 47, 47, 47, 67, 327, 217, 133, 52, 313, 142, 229, 198, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [103, 186, 163, 47, 47, 47, 67, 327, 217, 214, 208, 70, 163, 229, 198, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [222, 186, 163, 105, 105, 23, 67, 327, 217, 133, 52, 313, 142, 229, 198, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [222, 250, 70, 163, 229, 198, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [62, 104, 214, 245, 245, 87, 303, 87, 303, 333, 118, 226, 226, 112, 43, 232, 112, 142, 120, 317, 143, 191, 233, 56],
    [61, 186, 163, 105, 105, 23, 67, 327, 217, 133, 52, 313, 379, 229, 198, 0, 0, 0, 0, 0, 0, 0, 0, 0],
]


def _demo_prompts(data) -> dict:
    """Four image rows with the caption prompt beside three text-only prompts of other lengths (the demo's task
    prompts), collated as m6lit's predict batches are: right-padded, `image_mask` False on the text rows."""
    tok = data.tokenizer
    g = torch.Generator().manual_seed(7)
    caption = torch.tensor(tok.encode("caption:", add_special_tokens=False))
    examples = [{"prefix": caption, "target": caption[:0], "pixel_values": torch.rand(3, 48, 48, generator=g) * 2 - 1,
                 "task": "caption", "reference": None} for _ in range(4)]
    for text in ("text: a large red", "denoise: a small blue circle in the top", "caption:"):
        ids = torch.tensor(tok.encode(text, add_special_tokens=False))
        examples.append({"prefix": ids, "target": ids[:0], "pixel_values": None, "task": "caption",
                         "reference": None})
    return collate(examples, pad_token_id=data.pad_token_id)


def _demo_module(data, **extra) -> M6LitModule:
    torch.manual_seed(0)
    config = dict(vocab_size=data.vocab_size, d_model=32, n_heads=4, d_ff=64, num_layers=4, num_unique_blocks=2,
                  moe_layers=2, num_experts=4, top_k=2, expert_d_ff=32, image_size=48, patch_size=16,
                  max_seq_len=224, pad_token_id=data.pad_token_id, eos_token_id=data.eos_token_id, init_std=0.1)
    config.update(extra)
    module = M6LitModule(M6Config(**config), max_new_tokens=24).eval()
    with torch.no_grad():  # larger position embeddings make greedy continuations vary from step to step
        module.model.embed.patches.pos.normal_(std=0.5)
        module.model.embed.text_pos.weight.normal_(std=0.5)
    return module


@torch.no_grad()
def test_greedy_generation_equals_the_former_decoder_on_the_demo_prompts() -> None:
    data = ImageTextDataModule(predict=[SourceSpec(kind="demo", num_samples=8, seed=2)], image_size=48,
                               batch_size=8)
    batch = _demo_prompts(data)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and batch["image_mask"].tolist() == [True] * 4 + [False] * 3
    module = _demo_module(data)
    assert module.generate(batch, do_sample=False).tolist() == GREEDY_BEFORE
    assert module.generate(batch, do_sample=False, eos_token_id=198).tolist() == GREEDY_STOPPING_AT_198_BEFORE
    for use_cache in (True, False):
        assert module.generate(batch, do_sample=False, use_cache=use_cache).tolist() == GREEDY_BEFORE
    # a model whose vocabulary also holds image codes never emits one in text
    with_codes = _demo_module(data, vocab_size=data.vocab_size + 2 + 16, image_codebook_size=16, image_grid_size=3)
    tokens = with_codes.generate(batch, do_sample=False)
    assert tokens.tolist() == GREEDY_WITH_IMAGE_VOCAB_BEFORE and int(tokens.max()) < data.vocab_size
    # the same continuation for one row alone, unpadded: padding changes nothing
    alone = {k: v[4:5] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim()}
    alone = dict(alone, input_ids=alone["input_ids"][:, :lengths[4]],
                 attention_mask=alone["attention_mask"][:, :lengths[4]])
    assert module.generate(alone, do_sample=False).tolist() == GREEDY_BEFORE[4:5]
