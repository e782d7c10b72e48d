"""Training shards: write LLaVA records + media as tar shards, read them back at random."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from model.processing import SampleProcessor
from model.shard_writer import write_shards
from model.shards import ShardDataset, open_shards
from onevision import storage


def _records(media_dir: Path):
    q = lambda ph: [{"from": "human", "value": f"{ph}What is it?"}, {"from": "gpt", "value": "red"}]  # noqa: E731
    records = [{"id": f"img/{i}.x", "image": "100x200.png", "conversations": q("<image>\n")} for i in range(5)]
    records.append({"id": "multi", "image": ["56x56.png", "90x60.png"], "conversations": q("<image><image>\n")})
    records.append({"id": "vid", "video": "clip.mp4", "conversations": q("<video>\n")})
    records.append({"id": "text", "conversations": q("")})
    for record in records:
        paths = [record[k] for k in ("image", "video") if k in record]
        flat = [p for v in paths for p in ([v] if isinstance(v, str) else v)]
        yield record, {p: (media_dir / p).read_bytes() for p in flat}


def test_shards_round_trip_to_the_same_model_inputs(tiny, media_dir: Path, tmp_path: Path) -> None:
    _, processor = tiny
    shards = write_shards(_records(media_dir), tmp_path / "shards", max_per_shard=3)
    assert len(shards) == 3
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    assert all(name.count(".") >= 1 and "/" not in name.split(".")[0] for name in names)

    sp = SampleProcessor(processor, "qwen_1_5", 4096, video_frames=4, media_root=media_dir)
    with pytest.raises(FileNotFoundError, match="no published shards"):  # written, not yet published
        open_shards(str(tmp_path / "shards"))
    storage.publish_dir(tmp_path / "shards", tmp_path / "published")
    dataset = ShardDataset(open_shards(str(tmp_path / "published")), sp)
    assert len(dataset) == 8
    originals = {r["id"]: r for r, _ in _records(media_dir)}
    for index in (7, 0, 5, 6):  # random access, any order
        from_shard = dataset[index]
        direct = sp(originals[from_shard.id])
        assert torch.equal(from_shard.input_ids, direct.input_ids)
        assert all(torch.equal(a, b) for a, b in zip(from_shard.pixel_values, direct.pixel_values))
        assert len(from_shard.pixel_values_videos) == len(direct.pixel_values_videos)
        assert all(torch.equal(a, b) for a, b in zip(from_shard.pixel_values_videos, direct.pixel_values_videos))
    lengths, visual = dataset.lengths()
    assert visual.tolist() == [True] * 7 + [False]
    assert lengths[5] > lengths[7]  # two images outweigh text


@pytest.mark.parametrize("max_per_shard, max_bytes, shards", [(3, 3 << 30, 3), (1000, 1, 8), (1000, 3 << 30, 1)])
def test_shard_writer_writes_webdataset_s_bytes(media_dir: Path, tmp_path: Path, max_per_shard: int,
                                                max_bytes: int, shards: int) -> None:
    """Our tarfile writer against webdataset's own ShardWriter on the same samples: the same files, byte for
    byte, whether shards close on the record count, on size or not at all; and for no sample at all (one
    empty shard, as webdataset writes)."""
    import webdataset as wds

    from model.shard_index import INDEX_NAME, index_shards, read_index
    from model.shard_writer import sample_members, shard_key

    def webdataset_shards(samples: list, out: Path) -> dict[str, bytes]:
        out.mkdir(parents=True)
        with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_per_shard, maxsize=max_bytes,
                             verbose=0, mtime=0) as sink:
            for index, (record, media) in enumerate(samples):
                sink.write({"__key__": shard_key(str(record["id"]), index), **sample_members(record, media)})
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}

    odd = [({"id": "x" * 90, "image": f"pic.{'e' * 12}", "conversations": []}, {f"pic.{'e' * 12}": b"long name"}),
           ({"id": "accent", "image": "pic.jpég", "conversations": []}, {"pic.jpég": b"\xff" * 700})]
    for name, samples, count in (("all", list(_records(media_dir)), shards), ("none", [], 1),
                                 ("odd names", odd, 2 if max_bytes == 1 else 1)):
        ours = write_shards(samples, tmp_path / name / "ours", max_per_shard=max_per_shard, max_bytes=max_bytes)
        assert {p.name: p.read_bytes() for p in ours} == webdataset_shards(samples, tmp_path / name / "wds"), name
        assert len(ours) == count, name
        # the index taken while writing is the one read back from the tars (offsets, sizes, members...)
        assert read_index(ours[0].parent / INDEX_NAME).equals(index_shards(ours)), name


@pytest.mark.parametrize("name", ["a.json", "0" * 100, "0" * 101, "k.img0.jpég", "k.vid0.mp4"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 8 ** 11 - 1, 8 ** 11])
def test_member_header_is_tarfile_s(name: str, size: int) -> None:
    """The filled-in ustar header equals tarfile's own (PAX format), pax records included where they are due."""
    from model.shard_writer import MEMBER_MODE, MEMBER_OWNER, member_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, MEMBER_MODE, MEMBER_OWNER, MEMBER_OWNER
    assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT)


def test_curation_s_writer_does_not_import_torch() -> None:
    """A curate pod imports the writer and the curation core without torch (1.4 s of its start)."""
    import subprocess
    import sys

    code = ("import sys, components.curate.core, model.shard_writer; "
            "sys.exit('torch imported' if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_sample_without_its_media_bytes_is_a_clear_error(tmp_path: Path) -> None:
    record = {"id": "r1", "image": ["a.png", "b.png"], "conversations": []}
    with pytest.raises(ValueError, match=r"record 'r1': no bytes given for its image 'b.png'"):
        write_shards([(record, {"a.png": b"x"})], tmp_path / "out")
