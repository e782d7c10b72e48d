"""Storage against the real local S3 (SeaweedFS `weed mini` on loopback)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from onevision import stack, storage
from tests.conftest import free_port_block

BUCKET = "s3://onevision/tests"


def test_file_round_trip_and_listing(local_stack: object, tmp_path: Path) -> None:
    src = tmp_path / "x.bin"
    src.write_bytes(os.urandom(12345))
    storage.put_file(src, f"{BUCKET}/files/x.bin")
    assert storage.exists(f"{BUCKET}/files/x.bin") and storage.exists(f"{BUCKET}/files")
    assert not storage.exists(f"{BUCKET}/files/missing.bin")
    assert storage.list_uris(f"{BUCKET}/files") == [f"{BUCKET}/files/x.bin"]
    back = storage.get_file(f"{BUCKET}/files/x.bin", tmp_path / "back.bin")
    assert back.read_bytes() == src.read_bytes()
    with storage.open_read(f"{BUCKET}/files/x.bin") as stream:
        assert stream.read(100) == src.read_bytes()[:100]
    with pytest.raises(storage.StorageNotFoundError, match="NoSuchKey"):
        storage.read_bytes(f"{BUCKET}/files/missing.bin")


def test_directory_publish_round_trip(local_stack: object, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    for i in range(5):
        (src / "a" / "b" / f"shard-{i}.tar").write_bytes(os.urandom(1000 + i))
    manifest = storage.publish_dir(src, f"{BUCKET}/dir", metadata={"shards": 5})
    assert len(manifest["files"]) == 5
    out = storage.get_dir(f"{BUCKET}/dir", tmp_path / "out")
    for i in range(5):
        name = f"a/b/shard-{i}.tar"
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert len(storage.manifest_hash(f"{BUCKET}/dir")) == 64


def test_50mb_multipart_round_trip(local_stack: object, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as out:
        for _ in range(50):
            out.write(os.urandom(1 << 20))
    storage.put_file(big, f"{BUCKET}/big/big.bin")
    loc = storage.parse_s3(f"{BUCKET}/big/big.bin")
    stat = storage.s3_client().stat_object(loc.bucket, loc.key)
    assert stat.size == 50 << 20
    assert "-" in stat.etag.strip('"'), "a 50 MB object is uploaded as multipart (etag '<md5>-<parts>')"
    back = storage.get_file(f"{BUCKET}/big/big.bin", tmp_path / "back.bin")
    assert storage.sha256_file(back) == storage.sha256_file(big)


def test_interrupted_publish_is_invisible(local_stack: object, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"part-{i}").write_bytes(os.urandom(500))
    real_put = storage.put_file
    calls = []

    def crash_after_two(local: str, uri: str) -> None:
        if len(calls) == 2:
            raise KeyboardInterrupt("pod killed")
        calls.append(uri)
        real_put(local, uri)

    monkeypatch.setattr(storage, "put_file", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        storage.publish_dir(src, f"{BUCKET}/interrupted")
    assert len(storage.list_uris(f"{BUCKET}/interrupted")) == 2  # the objects are there...
    with pytest.raises(storage.ManifestMissingError):  # ...but no reader will take them
        storage.read_manifest(f"{BUCKET}/interrupted")
    with pytest.raises(storage.ManifestMissingError):
        storage.get_dir(f"{BUCKET}/interrupted", tmp_path / "out")


def test_stopped_s3_gives_clear_error_after_bounded_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second, private S3 server: it serves, is stopped, and clients then fail cleanly."""
    state = tmp_path / "s3only"
    info = stack.stack_up(state, s3_port=free_port_block(10), services=("s3",))
    for key, value in info.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ONEVISION_S3_RETRIES", "2")
    monkeypatch.setenv("ONEVISION_S3_BACKOFF", "0.1")
    storage.write_bytes("s3://onevision/alive", b"1")
    pid = int((state / "s3.pid").read_text())
    assert stack.stack_down(state) == ["s3"]
    assert not Path(f"/proc/{pid}").exists() or b"weed" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes("s3://onevision/alive")
    assert info.s3_endpoint in str(err.value) and "after 3 attempts" in str(err.value)
    assert time.monotonic() - started < 60, "retries are bounded, not endless"
