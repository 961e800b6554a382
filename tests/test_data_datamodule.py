"""ImageTextDataModule and the M6 tasks: the batch contract, span denoising, bad samples, resumable loading."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from m6lit.data.datamodule import ImageTextDataModule
from m6lit.data.sources import BadSampleError, SourceSpec
from m6lit.data.tasks import PROMPTS, TaskMix, collate, span_corrupt
from m6lit.data.tokenizer import load_tokenizer, sentinel_ids


def _demo(n: int = 48, seed: int = 0, text_only: float = 0.0, **kw: object) -> list[SourceSpec]:
    return [SourceSpec(kind="demo", num_samples=n, seed=seed, text_only_fraction=text_only, **kw)]


def _dm(train: list[SourceSpec] | None = None, **kw: object) -> ImageTextDataModule:
    kw.setdefault("batch_size", 6)
    kw.setdefault("image_size", 16)
    return ImageTextDataModule(
        train=train if train is not None else _demo(text_only=0.3),
        val=_demo(12, seed=1, text_only=0.3),
        test=_demo(12, seed=2),
        predict=_demo(8, seed=3, text_only=0.25),
        **kw,
    )


def _check_contract(batch: dict, dm: ImageTextDataModule, examples: list[dict | None] | None = None) -> None:
    """Assert every rule of the batch contract; with ``examples``, also that rows hold exactly those examples."""
    ids, mask, labels, prefix_len = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prefix_len"]
    b, t = ids.shape
    assert ids.dtype == torch.long and labels.dtype == torch.long and prefix_len.dtype == torch.long
    assert mask.dtype == torch.bool and mask.shape == labels.shape == (b, t) and prefix_len.shape == (b,)
    assert t % 8 == 0 and b >= 1
    assert batch["num_skipped"].dtype == torch.long and batch["num_skipped"].dim() == 0
    lengths = mask.sum(1)
    assert t - 8 < int(lengths.max()) <= t
    prompts = {task: dm.tokenizer.encode(p, add_special_tokens=False) for task, p in PROMPTS.items()}
    for row in range(b):
        n, p = int(lengths[row]), int(prefix_len[row])
        assert 1 <= p < n
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == dm.pad_token_id).all()
        assert (labels[row, :p] == -100).all() and (labels[row, n:] == -100).all()
        assert torch.equal(labels[row, p:n], ids[row, p:n])
        assert int(ids[row, n - 1]) == dm.eos_token_id
        head = ids[row, :p].tolist()
        assert any(head[: len(q)] == q for q in prompts.values())
        if head[: len(prompts["denoise"])] != prompts["denoise"]:
            assert head in (prompts["caption"], prompts["lm"])
    if "pixel_values" in batch:
        pixels, image_mask = batch["pixel_values"], batch["image_mask"]
        assert pixels.dtype == torch.float32 and pixels.shape == (b, 3, dm.image_size, dm.image_size)
        assert image_mask.dtype == torch.bool and image_mask.shape == (b,) and image_mask.any()
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
        assert (pixels[~image_mask] == 0).all()
        assert (pixels[image_mask].flatten(1).std(1) > 0).all()
    else:
        assert "image_mask" not in batch
    if examples is not None:
        rows = [e for e in examples if e is not None]
        assert int(batch["num_skipped"]) == len(examples) - len(rows) and b == len(rows)
        has_image = [e["pixel_values"] is not None for e in rows]
        if any(has_image):
            assert batch["image_mask"].tolist() == has_image
        else:
            assert "pixel_values" not in batch
        for row, e in enumerate(rows):
            assert int(prefix_len[row]) == len(e["prefix"])
            expected = e["prefix"].tolist() + e["target"].tolist()
            assert ids[row, : len(expected)].tolist() == expected


def test_train_batches_satisfy_the_contract() -> None:
    dm = _dm()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 8
    assert any("pixel_values" in b and not b["image_mask"].all() for b in batches), "expected a mixed batch"
    for batch in batches:
        _check_contract(batch, dm)
        assert int(batch["num_skipped"]) == 0


def test_rows_match_examples_in_mixed_and_text_only_batches() -> None:
    dm = _dm()
    dataset = dm.dataset("train")
    tasks = [dataset[i]["task"] for i in range(48)]
    mixed = [i for i in range(48) if tasks[i] != "lm"][:3] + [i for i in range(48) if tasks[i] == "lm"][:3]
    text_only = [i for i in range(48) if tasks[i] == "lm"][:4]
    for indices in (mixed, text_only):
        examples = [dataset[i] for i in indices]
        _check_contract(collate(examples, dm.pad_token_id), dm, examples)
    assert "pixel_values" not in collate([dataset[i] for i in text_only], dm.pad_token_id)


def test_text_only_source_never_gets_caption_or_pixels() -> None:
    dm = _dm(train=_demo(40, text_only=1.0))
    dataset = dm.dataset("train")
    assert {dataset[i]["task"] for i in range(40)} == {"denoise", "lm"}
    for batch in dm.train_dataloader():
        assert "pixel_values" not in batch and "image_mask" not in batch
        _check_contract(batch, dm)


def test_task_choice_follows_the_mix_and_image_rules() -> None:
    dm = _dm(train=_demo(400), task_mix=TaskMix(caption=0.6, denoise=0.2, lm=0.2))
    dataset = dm.dataset("train")
    examples = [dataset[i] for i in range(400)]
    counts = {task: sum(e["task"] == task for e in examples) for task in PROMPTS}
    assert 200 < counts["caption"] < 280 and 50 < counts["denoise"] < 110 and 50 < counts["lm"] < 110
    assert all((e["pixel_values"] is None) == (e["task"] == "lm") for e in examples)
    again = _dm(train=_demo(400), task_mix=TaskMix(caption=0.6, denoise=0.2, lm=0.2)).dataset("train")
    assert [again[i]["task"] for i in range(400)] == [e["task"] for e in examples]
    other_seed = _dm(train=_demo(400), task_mix=TaskMix(caption=0.6, denoise=0.2, lm=0.2), seed=5).dataset("train")
    assert [other_seed[i]["task"] for i in range(400)] != [e["task"] for e in examples]


def _fill_sentinels(inputs: list[int], targets: list[int], sentinels: set[int]) -> list[int]:
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets:
        if token in sentinels:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    return [x for token in inputs for x in (spans[token] if token in sentinels else [token])]


def test_denoise_target_reconstructs_the_text() -> None:
    dm = _dm(train=_demo(60, text_only=0.5), task_mix=TaskMix(caption=0.0, denoise=1.0, lm=0.0))
    tokenizer, dataset, source = dm.tokenizer, dm.dataset("train"), dm.dataset("train").source
    sentinels = set(sentinel_ids(tokenizer))
    prompt = tokenizer.encode(PROMPTS["denoise"], add_special_tokens=False)
    for i in range(60):
        example = dataset[i]
        prefix, target = example["prefix"].tolist(), example["target"].tolist()
        assert prefix[: len(prompt)] == prompt and target[-1] == dm.eos_token_id
        corrupted, spans = prefix[len(prompt) :], target[:-1]
        assert corrupted != spans and any(t in sentinels for t in corrupted) and spans[0] in sentinels
        restored = _fill_sentinels(corrupted, spans, sentinels)
        assert tokenizer.decode(restored) == source[i]["text"]
        assert (example["pixel_values"] is None) == (source[i]["image"] is None)


def test_span_corrupt_over_units_never_splits_one() -> None:
    units = [[10, 11, 12], [20], [30, 31, 32], [40, 41, 42], [50], [60, 61, 62]] * 5
    sentinels = list(range(1000, 1125))
    for seed in range(5):
        inputs, targets = span_corrupt(units, sentinels, random.Random(seed), 0.3, 2.0)
        flat = [i for u in units for i in u]
        assert _fill_sentinels(inputs, targets, set(sentinels)) == flat
        for seq in (inputs, targets):
            runs, run = [], []
            for t in seq + [1000]:
                if t in sentinels:
                    runs.append(run)
                    run = []
                else:
                    run.append(t)
            for run in runs:  # every run of kept or dropped ids is a sequence of whole units
                while run:
                    unit = next(u for u in units if u[0] == run[0])
                    assert run[: len(unit)] == unit
                    run = run[len(unit):]


@pytest.mark.parametrize("length", [1, 2, 3, 10, 57, 200])
def test_span_corrupt_round_trip_and_density(length: int) -> None:
    sentinels = list(range(1000, 1125))
    ids = list(range(length))
    for seed in range(5):
        inputs, targets = span_corrupt(ids, sentinels, random.Random(seed), 0.15, 3.0)
        assert _fill_sentinels(inputs, targets, set(sentinels)) == ids
        used = [t for t in targets if t in sentinels]
        assert used == sentinels[: len(used)] and [t for t in inputs if t in sentinels] == used
        dropped = len(targets) - len(used)
        assert dropped >= 1 and (length == 1 or dropped < length)
        if length >= 57:
            assert abs(dropped - 0.15 * length) <= 1


def test_every_demo_sample_fits_the_default_text_budget() -> None:
    dm = ImageTextDataModule(train=_demo(1500, text_only=0.2), task_mix=TaskMix(1.0, 1.0, 1.0))
    dataset = dm.dataset("train")
    for i in range(1500):
        assert dataset[i] is not None


def test_val_and_test_loaders_are_deterministic_and_in_order() -> None:
    dm = _dm()
    dm.setup("validate")
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) == 2
    for a, b in zip(first, second):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dataset = dm.dataset("val")
    expected = collate([dataset[i] for i in range(6)], dm.pad_token_id)
    assert torch.equal(first[0]["input_ids"], expected["input_ids"])
    for batch in dm.test_dataloader():
        _check_contract(batch, dm)


def test_predict_batches_carry_prompt_image_and_reference() -> None:
    dm = _dm()
    dm.setup("predict")
    prompt = dm.tokenizer.encode(PROMPTS["caption"], add_special_tokens=False)
    source = dm.dataset("predict").source
    index = 0
    for batch in dm.predict_dataloader():
        b, t = batch["input_ids"].shape
        assert t % 8 == 0 and (batch["prefix_len"] == len(prompt)).all()
        assert (batch["labels"] == -100).all()
        assert batch["input_ids"][:, : len(prompt)].tolist() == [prompt] * b
        assert batch["attention_mask"].sum(1).tolist() == [len(prompt)] * b
        for row in range(b):
            sample = source[index]
            assert bool(batch["image_mask"][row]) == (sample["image"] is not None)
            reference = batch["reference_ids"][row]
            text = reference[reference != dm.pad_token_id].tolist()
            assert text[-1] == dm.eos_token_id and dm.tokenizer.decode(text[:-1]) == sample["text"]
            assert batch["sources"][row] == {"origin": sample["origin"]}
            index += 1
    assert index == 8


# ------------------------------------------------------------------------------------ bad samples, budget


def _manifest(tmp_path: Path) -> Path:
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "red.png")
    lines = [
        json.dumps({"image": "red.png", "text": "a red square"}),
        json.dumps({"text": "x" * 300}),
        json.dumps({"text": "fine text"}),
        '{"text": broken',
        json.dumps({"image": "red.png", "text": "红色" * 40}),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_too_long_text_raises_with_file_line(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    dm = _dm(train=[SourceSpec(kind="jsonl", path=str(manifest))], max_text_len=64)
    dataset = dm.dataset("train")
    assert dataset[0] is not None
    with pytest.raises(BadSampleError, match=rf"{manifest}:2: text too long: 300 tokens.*max_text_len 64"):
        dataset[1]
    with pytest.raises(BadSampleError, match=rf"{manifest}:4: malformed JSON"):
        dataset[3]
    with pytest.raises(BadSampleError, match=rf"{manifest}:5: text too long: 240 tokens"):
        dataset[4]


def test_truncate_text_cuts_long_texts_at_character_boundaries(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    dm = _dm(train=[SourceSpec(kind="jsonl", path=str(manifest))], max_text_len=64, truncate_text=True)
    dataset = dm.dataset("train")
    for index, original in ((1, "x" * 300), (4, "红色" * 40)):
        example = dataset[index]
        assert len(example["prefix"]) + len(example["target"]) <= 64
        if example["task"] == "denoise":
            continue
        text = dm.tokenizer.decode(example["target"][:-1].tolist())
        assert len(text) > 10 and original.startswith(text), text  # a clean prefix: no half character


def test_chinese_denoise_spans_keep_whole_characters() -> None:
    dm = _dm(train=_demo(40, language="zh"), task_mix=TaskMix(caption=0.0, denoise=1.0, lm=0.0))
    tokenizer, dataset = dm.tokenizer, dm.dataset("train")
    sentinels = set(sentinel_ids(tokenizer))
    prompt = len(tokenizer.encode(PROMPTS["denoise"], add_special_tokens=False))
    for i in range(40):
        example = dataset[i]
        pieces, piece = [], []
        for token in example["prefix"].tolist()[prompt:] + [-1] + example["target"].tolist()[:-1] + [-1]:
            if token in sentinels or token == -1:
                pieces.append(piece)
                piece = []
            else:
                piece.append(token)
        for piece in pieces:
            raw = bytes(t - 3 for t in piece)  # ByT5: id = byte + 3
            raw.decode("utf-8")  # raises if a span split a character


def test_skip_counts_bad_samples_in_batches_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = _manifest(tmp_path)
    dm = _dm(train=[SourceSpec(kind="jsonl", path=str(manifest))], max_text_len=64, on_bad_sample="skip",
             batch_size=2)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="m6lit.data"):
        batches = list(dm.train_dataloader())
    assert sum(int(b["num_skipped"]) for b in batches) == 3
    assert sum(b["input_ids"].shape[0] for b in batches) == 2
    for batch in batches:
        if batch["input_ids"].shape[0]:
            _check_contract(batch, dm)
    messages = [r.getMessage() for r in caplog.records if r.name == "m6lit.data"]
    assert len(messages) == 3
    assert {f"{manifest}:{n}" for n in (2, 4, 5)} == {m.split(": ")[0].split()[-1] for m in messages}


def test_all_skipped_batch_has_zero_rows() -> None:
    batch = collate([None, None], pad_token_id=0)
    assert batch["input_ids"].shape == (0, 0) and int(batch["num_skipped"]) == 2
    assert "pixel_values" not in batch


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="task_mix"):
        ImageTextDataModule(task_mix=TaskMix(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="weight"):
        ImageTextDataModule(train=[SourceSpec(weight=1.0), SourceSpec(seed=1)])
    with pytest.raises(ValueError, match="needs a path"):
        ImageTextDataModule(train=[SourceSpec(kind="jsonl")]).dataset("train")
    with pytest.raises(ValueError, match="max_text_len"):
        ImageTextDataModule(max_text_len=8)


def test_weighted_mix_of_sources() -> None:
    dm = _dm(train=[SourceSpec(num_samples=30, seed=0, weight=3.0),
                    SourceSpec(num_samples=30, seed=9, weight=1.0, text_only_fraction=1.0)])
    mixed = dm.dataset("train").source
    assert len(mixed) == 60
    located = [mixed.locate(i) for i in range(60)]
    assert sum(s == 0 for s, _ in located) == 45 and sum(s == 1 for s, _ in located) == 15
    assert len({j for s, j in located if s == 0}) == 30 and len({j for s, j in located if s == 1}) == 15


def test_properties_from_the_tokenizer() -> None:
    dm = ImageTextDataModule()
    assert (dm.vocab_size, dm.pad_token_id, dm.eos_token_id) == (384, 0, 1)
    assert dm.vocab_size == len(load_tokenizer())


def test_configurable_from_yaml_with_jsonargparse(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        "  train:\n"
        "    - {kind: demo, num_samples: 10, seed: 4, weight: 2.0}\n"
        "    - {kind: demo, num_samples: 5, seed: 5, weight: 1.0, language: zh}\n"
        "  batch_size: 3\n"
        "  task_mix: {caption: 1.0, denoise: 0.0, lm: 0.0}\n"
        "  on_bad_sample: skip\n",
        encoding="utf-8",
    )
    parser = ArgumentParser()
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(ImageTextDataModule, "data")
    dm = parser.instantiate(parser.parse_args(["--config", str(config)])).data
    assert isinstance(dm, ImageTextDataModule)
    assert [s.seed for s in dm.specs["train"]] == [4, 5] and dm.specs["train"][1].language == "zh"
    assert dm.task_mix == TaskMix(1.0, 0.0, 0.0) and dm.on_bad_sample == "skip" and dm.batch_size == 3
    assert len(dm.dataset("train")) == 15


# ------------------------------------------------------------------------------------------------- resume


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _write_shards(directory: Path) -> str:
    directory.mkdir()
    for s in range(4):
        with wds.TarWriter(str(directory / f"{s:03d}.tar")) as sink:
            for i in range(8):
                sink.write({"__key__": f"k{s}_{i}", "txt": f"shard {s} sample {i}".encode(),
                            "png": Image.new("RGB", (16, 16), (40 * s, 20 * i, 9))})
    return str(directory / "{000..003}.tar")


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["map", "webdataset"])
def test_stateful_loader_resumes_with_the_next_batches(tmp_path: Path, num_workers: int, kind: str) -> None:
    if kind == "map":
        train = _demo(60, text_only=0.2)
    else:
        train = [SourceSpec(kind="webdataset", path=_write_shards(tmp_path / "wds"), weight=3.0),
                 SourceSpec(kind="demo", num_samples=40, weight=1.0)]

    def loader():
        dm = _dm(train=train, batch_size=4, num_workers=num_workers, shuffle_buffer=6)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader()
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    expected = [next(iterator) for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(state)
    got = list(zip(range(2), resumed))
    assert all(_same(e, g) for e, (_, g) in zip(expected, got))
    assert not _same(expected[0], expected[1])


@pytest.mark.parametrize("kind", ["map", "webdataset"])
def test_epochs_reshuffle_and_resume_across_the_boundary(tmp_path: Path, kind: str) -> None:
    if kind == "map":
        train = _demo(16)
    else:
        train = [SourceSpec(kind="webdataset", path=_write_shards(tmp_path / "wds"))]

    def loader():
        dm = _dm(train=train, batch_size=4, shuffle_buffer=6)
        dm.setup("fit")
        return dm.train_dataloader()

    first = loader()
    epoch0 = list(first)
    state = first.state_dict()
    if kind == "map":
        first.sampler.set_epoch(1)
    epoch1 = list(first)
    assert len(epoch0) == len(epoch1) and not all(_same(a, b) for a, b in zip(epoch0, epoch1))
    ids0 = sorted(tuple(r) for b in epoch0 for r in b["input_ids"].tolist())
    ids1 = sorted(tuple(r) for b in epoch1 for r in b["input_ids"].tolist())
    assert len(ids0) == len(ids1)
    resumed = loader()
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(epoch1, resumed))
    fresh = loader()
    assert all(_same(a, b) for a, b in zip(epoch0, fresh))


# ------------------------------------------------------------------------------------ images, import hygiene


def test_image_to_tensor_resizes_shorter_side_and_center_crops() -> None:
    from m6lit.data.tasks import image_to_tensor

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (20, 0, 40, 20))
    tensor = image_to_tensor(wide, 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, :, 0], torch.tensor([1.0, -1.0, -1.0]).view(3, 1).expand(3, 16))
    assert torch.allclose(tensor[:, :, -1], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1).expand(3, 16))
    tall_grey = image_to_tensor(Image.new("L", (5, 9), 128), 16)
    assert tall_grey.shape == (3, 16, 16) and tall_grey.abs().max() < 0.01


def test_data_package_imports_without_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys, m6lit.data, m6lit.data.sources, m6lit.data.tasks, m6lit.data.demo, m6lit.data.tokenizer\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'datasets')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fewer_webdataset_shards_than_ranks_is_an_up_front_error(tmp_path: Path) -> None:
    from types import SimpleNamespace

    shards = _write_shards(tmp_path / "wds")
    dm = _dm(train=[SourceSpec(kind="webdataset", path=shards)])
    dm.trainer = SimpleNamespace(world_size=16)
    with pytest.raises(ValueError, match=r"data.train: the webdataset source .* has \d+ shard\(s\) for 16 rank"):
        dm.setup("fit")
