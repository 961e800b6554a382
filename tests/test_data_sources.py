"""Sample sources: JSONL manifests, WebDataset shards, HF datasets; bad samples raise with their origin or are
skipped, counted and logged."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from m6lit.data.sources import BadSampleError, HFSource, JsonlSource, WebDatasetSource, open_image

GOOD = [
    {"image": "red.png", "text": "a red square"},
    {"text": "only text, no image"},
    {"image": "sub/blue.jpg", "text": "一个蓝色的图"},
]
# (line content, expected reason fragment) — each is bad for the source itself.
BAD = [
    ('{"text": "unterminated"', "malformed JSON"),
    ('{"image": "red.png"}', "missing 'text'"),
    ('{"text": "   "}', "empty 'text'"),
    ('{"text": 5}', "'text' must be a string"),
    ('["text", "a list"]', "expected a JSON object"),
    ('{"image": "missing.png", "text": "no such file"}', "image file not found"),
    ('{"image": "corrupt.jpg", "text": "broken bytes"}', "cannot decode"),
    ('{"image": 7, "text": "bad path type"}', "must be a non-empty path string"),
]


def _image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture()
def image_dir(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "red.png").write_bytes(_image_bytes((255, 0, 0)))
    (tmp_path / "sub" / "blue.jpg").write_bytes(_image_bytes((0, 0, 255), "JPEG", size=30))
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return tmp_path


def _write_manifest(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_good_manifest_loads_images_and_text_only(image_dir: Path) -> None:
    lines = [json.dumps(g, ensure_ascii=False) for g in GOOD]
    source = JsonlSource(_write_manifest(image_dir / "m.jsonl", lines[:2] + [""] + lines[2:]))
    assert len(source) == 3
    samples = [source[i] for i in range(3)]
    assert [s["text"] for s in samples] == [g["text"] for g in GOOD]
    assert samples[0]["image"].mode == "RGB" and samples[0]["image"].getpixel((0, 0)) == (255, 0, 0)
    assert samples[1]["image"] is None
    assert samples[2]["image"].size == (30, 30)
    assert samples[2]["origin"].endswith("m.jsonl:4")


def test_jsonl_image_root_overrides_manifest_dir(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("manifests")
    manifest = _write_manifest(elsewhere / "m.jsonl", [json.dumps(GOOD[0])])
    assert JsonlSource(manifest, image_root=image_dir)[0]["image"] is not None
    with pytest.raises(BadSampleError, match="image file not found"):
        JsonlSource(manifest)[0]


@pytest.mark.parametrize(("line", "reason"), BAD, ids=[r for _, r in BAD])
def test_jsonl_bad_line_raises_with_file_line_and_reason(image_dir: Path, line: str, reason: str) -> None:
    manifest = _write_manifest(image_dir / "bad.jsonl", [json.dumps(GOOD[1]), "", line])
    source = JsonlSource(manifest)
    assert source[0]["text"] == GOOD[1]["text"]
    with pytest.raises(BadSampleError) as info:
        source[1]
    message = str(info.value)
    assert f"{manifest}:3" in message
    assert reason in message


def test_jsonl_skip_yields_good_samples_counts_and_logs(image_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [json.dumps(g, ensure_ascii=False) for g in GOOD] + [line for line, _ in BAD]
    manifest = _write_manifest(image_dir / "mixed.jsonl", lines)
    source = JsonlSource(manifest, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="m6lit.data"):
        samples = [source[i] for i in range(len(source))]
    assert [s["text"] for s in samples if s is not None] == [g["text"] for g in GOOD]
    assert sum(s is None for s in samples) == len(BAD) == source.num_skipped
    warnings = [r for r in caplog.records if r.name == "m6lit.data" and r.levelno == logging.WARNING]
    assert len(warnings) == len(BAD)
    for number, (record, (_, reason)) in enumerate(zip(warnings, BAD), start=len(GOOD) + 1):
        assert f"{manifest}:{number}" in record.getMessage() and reason in record.getMessage()


def test_open_image_rejects_truncated_file(tmp_path: Path) -> None:
    data = _image_bytes((0, 255, 0), "PNG", size=64)
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSampleError, match="cannot decode"):
        open_image(tmp_path / "cut.png", "x:1")


# ----------------------------------------------------------------------------------------------- WebDataset


def _write_shards(directory: Path, shards: int = 4, per_shard: int = 3, corrupt_key: str | None = None) -> list[str]:
    """Write tiny shards; sample text is its key, images are png or jpg, text in txt or json."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        with wds.TarWriter(str(directory / f"shard-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                sample: dict = {"__key__": key}
                if key == corrupt_key:
                    sample["jpg"] = b"not an image at all"
                elif i % 3 != 2:
                    sample["png" if i % 2 else "jpg"] = _image_bytes((10 * s, 20 * i, 200), "PNG" if i % 2 else "JPEG")
                if i % 2:
                    sample["json"] = json.dumps({"text": key}).encode()
                else:
                    sample["txt"] = key.encode()
                sink.write(sample)
                keys.append(key)
    return keys


def test_webdataset_reads_every_sample_once_with_two_workers(tmp_path: Path) -> None:
    keys = _write_shards(tmp_path / "wds")
    source = WebDatasetSource(str(tmp_path / "wds" / "shard-{000000..000003}.tar"))
    loader = torch.utils.data.DataLoader(source, batch_size=None, num_workers=2, collate_fn=lambda s: s)
    samples = list(loader)
    assert sorted(s["text"] for s in samples) == sorted(keys)
    with_image = [s for s in samples if s["image"] is not None]
    assert len(with_image) == 8 and all(s["image"].mode == "RGB" for s in with_image)


def test_webdataset_ranks_get_disjoint_shards_covering_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_shards(tmp_path / "wds", shards=6, per_shard=1)
    for shuffle in (False, True):
        source = WebDatasetSource(str(tmp_path / "wds"), shuffle=shuffle, seed=3)
        for epoch in (0, 1):
            per_rank = []
            for rank in (0, 1):
                monkeypatch.setenv("RANK", str(rank))
                monkeypatch.setenv("WORLD_SIZE", "2")
                per_rank.append(source.shards(epoch))
            assert len(per_rank[0]) == len(per_rank[1]) == 3
            assert not set(per_rank[0]) & set(per_rank[1])
            assert set(per_rank[0]) | set(per_rank[1]) == set(source.urls)
            monkeypatch.setenv("RANK", "1")
            texts = [s["text"] for s in source.iterate(epoch)]
            assert sorted(texts) == sorted(f"s{Path(u).stem[-1]}_000" for u in per_rank[1])


def test_webdataset_shuffle_is_seeded_and_changes_per_epoch(tmp_path: Path) -> None:
    _write_shards(tmp_path / "wds", shards=6, per_shard=4)
    source = WebDatasetSource(str(tmp_path / "wds"), shuffle=True, seed=1, shuffle_buffer=5)
    first = [s["text"] for s in source.iterate(0)]
    assert first == [s["text"] for s in WebDatasetSource(str(tmp_path / "wds"), shuffle=True, seed=1,
                                                        shuffle_buffer=5).iterate(0)]
    assert first != [s["text"] for s in source.iterate(1)]
    assert sorted(first) == sorted(s["text"] for s in source.iterate(1))
    assert [s["text"] for s in source.iterate(0, skip=7)] == first[7:]


def test_webdataset_bad_sample_names_shard_and_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = _write_shards(tmp_path / "wds", shards=2, per_shard=3, corrupt_key="s1_000")
    with pytest.raises(BadSampleError, match=r"shard-000001\.tar:s1_000.*cannot decode"):
        list(WebDatasetSource(str(tmp_path / "wds")))
    source = WebDatasetSource(str(tmp_path / "wds"), on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="m6lit.data"):
        samples = list(source)
    assert sorted(s["text"] for s in samples if s is not None) == sorted(k for k in keys if k != "s1_000")
    assert sum(s is None for s in samples) == source.num_skipped == 1
    assert any("s1_000" in r.getMessage() for r in caplog.records if r.name == "m6lit.data")


def test_webdataset_missing_shards_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no WebDataset shards"):
        WebDatasetSource(str(tmp_path))


def test_webdataset_shards_without_samples_fail_instead_of_looping(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for name in ("a.tar", "b.tar"):
        with wds.TarWriter(str(tmp_path / "empty" / name)):
            pass
    with pytest.raises(ValueError, match=r"shards hold no samples: .*a\.tar"):
        list(WebDatasetSource(str(tmp_path / "empty")))


def test_webdataset_missing_shard_file_is_named(tmp_path: Path) -> None:
    _write_shards(tmp_path / "wds", shards=2)
    missing = tmp_path / "wds" / "shard-000007.tar"
    with pytest.raises(FileNotFoundError, match=f"WebDataset shard not found: {missing}"):
        WebDatasetSource([str(tmp_path / "wds" / "shard-000000.tar"), str(missing)])


def test_webdataset_samples_carry_their_key(tmp_path: Path) -> None:
    keys = _write_shards(tmp_path / "wds", shards=1, per_shard=2)
    samples = list(WebDatasetSource(str(tmp_path / "wds")))
    assert [s["key"] for s in samples] == keys
    assert samples[0]["origin"].endswith(f"shard-000000.tar:{keys[0]}")


def test_webdataset_reader_without_a_shard_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_shards(tmp_path / "wds", shards=1, per_shard=2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"1 shard\(s\) leave none for this reader \(rank 1"):
        list(WebDatasetSource(str(tmp_path / "wds")))


# --------------------------------------------------------------------------------------------- HF datasets


def test_hf_load_from_disk_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="HF datasets not installed (pip install 'm6lit[data]')")
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    table = datasets.Dataset.from_dict(
        {
            "picture": [Image.new("RGB", (12, 12), (255, 0, 0)), None, {"bytes": b"garbage", "path": None}],
            "caption": ["red", "text only", "corrupt image"],
        },
        features=features,
    )
    table.save_to_disk(str(tmp_path / "hf"))
    source = HFSource(str(tmp_path / "hf"), image_column="picture", text_column="caption")
    assert len(source) == 3
    assert source[0]["text"] == "red" and source[0]["image"].getpixel((3, 3)) == (255, 0, 0)
    assert source[1]["image"] is None and source[1]["text"] == "text only"
    with pytest.raises(BadSampleError, match=r"hf\[row 2\]: cannot decode"):
        source[2]
    skipping = HFSource(str(tmp_path / "hf"), image_column="picture", text_column="caption", on_bad_sample="skip")
    assert skipping[2] is None and skipping.num_skipped == 1


def test_hf_unknown_column_is_a_clear_error(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="HF datasets not installed (pip install 'm6lit[data]')")
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="no image column 'image'"):
        HFSource(str(tmp_path / "hf"))
    assert HFSource(str(tmp_path / "hf"), image_column=None)[0] == {
        "image": None, "text": "a", "origin": f"{tmp_path / 'hf'}[row 0]"
    }
