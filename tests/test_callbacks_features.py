"""FeatureWriter: shards + index matched to sample keys (JSONL, WebDataset, HF, demo), bad samples, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import webdataset as wds
from PIL import Image

from m6lit.callbacks.features import FeatureWriter, load_features
from m6lit.data.datamodule import ImageTextDataModule


class _TextSum(pl.LightningModule):
    """Features that identify the row: [sum of its text ids, text length] (so the test can check the match)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(1, 1)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        ids = batch["reference_ids"]
        valid = ids > 1  # not pad (0) / EOS (1)
        return {"features": torch.stack([(ids * valid).sum(1).float(), valid.sum(1).float()], 1)}


def _expected(text: str) -> list[float]:
    ids = [b + 3 for b in text.encode("utf-8")]  # the byte tokenizer: id = byte + 3
    return [float(sum(ids)), float(len(ids))]


def _predict(tmp_path: Path, specs: list[dict], writer: FeatureWriter, batch_size: int = 3, **data) -> None:
    dm = ImageTextDataModule(predict=specs, batch_size=batch_size, image_size=16, **data)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[writer],
                         default_root_dir=str(tmp_path))
    trainer.predict(_TextSum(), dm, return_predictions=False)


def _check(folder: Path, texts: dict[str, str]) -> list[dict]:
    feats, records = load_features(folder)
    assert len(records) == len(texts)
    for row, record in zip(feats.tolist(), records):
        assert row == _expected(texts[record["origin"]]), record
    return records


def _jsonl(tmp_path: Path, bad_line: int | None = None) -> tuple[Path, dict[str, str]]:
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "a.png")
    lines, texts = [], {}
    for i in range(7):
        if i == bad_line:
            lines.append("{not json")
            continue
        lines.append(json.dumps({"image": "a.png", "text": f"sample number {i}" + "!" * i}))
        texts[f"{tmp_path / 'data.jsonl'}:{i + 1}"] = f"sample number {i}" + "!" * i
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.jsonl", texts


def test_jsonl_features_in_shards_match_their_lines(tmp_path: Path) -> None:
    manifest, texts = _jsonl(tmp_path)
    _predict(tmp_path, [{"kind": "jsonl", "path": str(manifest)}], FeatureWriter("feats", shard_size=4))
    folder = tmp_path / "feats"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["features-00000.safetensors",
                                                                     "features-00001.safetensors"]
    records = _check(folder, texts)
    assert [r["row"] for r in records] == [0, 1, 2, 3, 0, 1, 2]
    assert all(r["image_path"].endswith("a.png") for r in records)
    assert [r["index"] for r in records] == list(range(7))


def test_skipped_bad_samples_leave_no_line_and_do_not_shift_the_others(tmp_path: Path) -> None:
    manifest, texts = _jsonl(tmp_path, bad_line=2)
    writer = FeatureWriter("feats", shard_size=4)
    _predict(tmp_path, [{"kind": "jsonl", "path": str(manifest)}], writer, on_bad_sample="skip")
    records = _check(tmp_path / "feats", texts)
    assert f"{manifest}:3" not in {r["origin"] for r in records} and writer.skipped_as_bad == 1


def test_webdataset_rows_carry_their_keys(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    texts = {}
    for s in range(2):
        url = str(tmp_path / "shards" / f"{s:03d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(3):
                text = f"shard {s} sample {i}" + "?" * (s + i)
                sink.write({"__key__": f"k{s}_{i}", "txt": text.encode(), "png": Image.new("RGB", (16, 16))})
                texts[f"{url}:k{s}_{i}"] = text
    _predict(tmp_path, [{"kind": "webdataset", "path": str(tmp_path / "shards" / "{000..001}.tar")}],
             FeatureWriter("feats", shard_size=5))
    records = _check(tmp_path / "feats", texts)
    assert {r["key"] for r in records} == {f"k{s}_{i}" for s in range(2) for i in range(3)}


def test_hf_rows_are_indexed_by_row(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"hf row {i}" + "#" * i for i in range(5)], "image": [None] * 5}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf"))
    _predict(tmp_path, [{"kind": "hf", "path": str(tmp_path / "hf"), "image_column": None}],
             FeatureWriter("feats", shard_size=2))
    feats, records = load_features(tmp_path / "feats")
    assert [r["index"] for r in records] == list(range(5))
    assert feats.tolist() == [_expected(t) for t in rows["text"]]


def test_a_second_run_resumes_and_an_interrupted_folder_is_repaired(tmp_path: Path) -> None:
    manifest, texts = _jsonl(tmp_path)
    spec = [{"kind": "jsonl", "path": str(manifest)}]
    _predict(tmp_path, spec, FeatureWriter("feats", shard_size=3))
    folder = tmp_path / "feats"
    again = FeatureWriter("feats", shard_size=3)
    _predict(tmp_path, spec, again)
    assert again.written == 0 and again.skipped_as_done == 7
    _check(folder, texts)
    # an interruption after shard 1 was renamed into place but before its index lines were written
    index = folder / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(line for line in lines if '"features-00001' not in line and '"features-00002'
                                not in line) + "\n")
    (folder / "features-00002.safetensors").unlink()
    (folder / ".features-00009.safetensors.tmp").write_bytes(b"partial")
    resumed = FeatureWriter("feats", shard_size=3)
    _predict(tmp_path, spec, resumed)
    assert resumed.written == 4 and not list(folder.glob(".*.tmp"))
    _check(folder, texts)


def test_a_malformed_index_or_a_missing_shard_is_named(tmp_path: Path) -> None:
    manifest, _ = _jsonl(tmp_path)
    spec = [{"kind": "jsonl", "path": str(manifest)}]
    _predict(tmp_path, spec, FeatureWriter("feats", shard_size=3))
    index = tmp_path / "feats" / "index.jsonl"
    index.write_text(index.read_text() + "garbage\n")
    with pytest.raises(ValueError, match=r"index.jsonl:8: not a FeatureWriter index line"):
        _predict(tmp_path, spec, FeatureWriter("feats"))
    index.write_text("\n".join(index.read_text().splitlines()[:7]) + "\n")
    (tmp_path / "feats" / "features-00000.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"index.jsonl:1: shard features-00000.safetensors is missing"):
        _predict(tmp_path, spec, FeatureWriter("feats"))
    with pytest.raises(FileExistsError, match="resume=False"):
        _predict(tmp_path, spec, FeatureWriter("feats", resume=False))


def test_bad_writer_options_are_refused() -> None:
    with pytest.raises(ValueError, match="shard_size=0"):
        FeatureWriter(shard_size=0)
    with pytest.raises(ValueError, match="dtype='int8'"):
        FeatureWriter(dtype="int8")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP on two local processes")
def test_two_ddp_ranks_write_the_features_one_process_writes(tmp_path: Path) -> None:
    here = Path(__file__).parent
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "M6LIT_TEST_OUT": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    for devices in (1, 2):
        proc = subprocess.run([sys.executable, str(here / "scripts" / "ddp_features.py"), str(devices)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "features2").glob("*index.jsonl")) == ["rank0-index.jsonl",
                                                                                      "rank1-index.jsonl"]
    one, one_records = load_features(tmp_path / "features1")
    two, two_records = load_features(tmp_path / "features2")
    assert len(one_records) == 9 and {r["origin"] for r in two_records} == {r["origin"] for r in one_records}
    order = {r["origin"]: i for i, r in enumerate(one_records)}
    torch.testing.assert_close(two, one[[order[r["origin"]] for r in two_records]], rtol=1e-5, atol=1e-6)
