"""Storage on local paths: the same API and guarantees as on S3, without a server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from onevision import storage


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.bin").write_bytes(os.urandom(4096))
    (root / "b.txt").write_text("hello")
    return root


def test_publish_then_get_dir_round_trips(tmp_path: Path) -> None:
    src = _tree(tmp_path / "src")
    manifest = storage.publish_dir(src, str(tmp_path / "pub"), metadata={"records": 2})
    assert set(manifest["files"]) == {"sub/a.bin", "b.txt"}
    assert manifest["total_bytes"] == 4096 + 5 and manifest["metadata"] == {"records": 2}
    out = storage.get_dir(str(tmp_path / "pub"), tmp_path / "out")
    assert (out / "sub" / "a.bin").read_bytes() == (src / "sub" / "a.bin").read_bytes()
    assert storage.read_manifest(str(tmp_path / "pub")) == manifest


def test_reader_of_unpublished_prefix_gets_clear_error(tmp_path: Path) -> None:
    storage.put_dir(_tree(tmp_path / "src"), str(tmp_path / "half"))  # objects, no manifest
    with pytest.raises(storage.ManifestMissingError, match="never published or its publish was interrupted"):
        storage.get_dir(str(tmp_path / "half"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupted_object_is_detected(tmp_path: Path) -> None:
    storage.publish_dir(_tree(tmp_path / "src"), str(tmp_path / "pub"))
    (tmp_path / "pub" / "b.txt").write_text("HELLO")  # same size, other bytes
    with pytest.raises(storage.StorageError, match="sha256 differ"):
        storage.get_dir(str(tmp_path / "pub"), tmp_path / "out")


def test_manifest_with_escaping_path_is_refused(tmp_path: Path) -> None:
    storage.publish_dir(_tree(tmp_path / "src"), str(tmp_path / "pub"))
    path = tmp_path / "pub" / storage.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["files"]["../../evil"] = {"size": 1, "sha256": "0"}
    path.write_text(json.dumps(manifest))
    with pytest.raises(storage.StorageError, match="unsafe path"):
        storage.get_dir(str(tmp_path / "pub"), tmp_path / "out")


def test_republish_replaces_manifest_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second publish that dies midway must not leave the old manifest vouching for new objects."""
    pub = str(tmp_path / "pub")
    storage.publish_dir(_tree(tmp_path / "v1"), pub)
    v2 = _tree(tmp_path / "v2")
    real_put = storage.put_file

    def dying_put(local: str, uri: str) -> None:
        if uri.endswith("b.txt"):
            raise KeyboardInterrupt("killed mid-publish")
        real_put(local, uri)

    monkeypatch.setattr(storage, "put_file", dying_put)
    with pytest.raises(KeyboardInterrupt):
        storage.publish_dir(v2, pub)
    with pytest.raises(storage.ManifestMissingError):
        storage.read_manifest(pub)


def test_file_helpers(tmp_path: Path) -> None:
    storage.write_bytes(str(tmp_path / "d" / "x.json"), b"{}")
    assert storage.read_bytes(str(tmp_path / "d" / "x.json")) == b"{}"
    assert storage.exists(str(tmp_path / "d" / "x.json")) and not storage.exists(str(tmp_path / "nope"))
    assert storage.list_uris(str(tmp_path / "d")) == [str(tmp_path / "d" / "x.json")]
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith(".part")]  # no temp leftovers
    with pytest.raises(storage.StorageNotFoundError):
        storage.get_file(str(tmp_path / "nope"), tmp_path / "y")
    with pytest.raises(storage.StorageNotFoundError):
        storage.read_bytes(str(tmp_path / "nope"))


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "s3://b/a/../../etc", "s3://b/k?x=1", "http://b/k"])
def test_bad_s3_uris_are_rejected(uri: str) -> None:
    with pytest.raises(storage.StorageError):
        storage.parse_s3(uri)


def test_s3_without_settings_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(storage.StorageError, match="AWS_ENDPOINT_URL"):
        storage.exists("s3://bucket/key")


def test_range_reads_stream_forward_in_windows_and_jump_exactly(tmp_path) -> None:
    data = bytes(range(256)) * 400  # 102,400 bytes
    (tmp_path / "blob").write_bytes(data)
    assert storage.read_range(str(tmp_path / "blob"), 100, 50) == data[100:150]
    assert storage.read_range(str(tmp_path / "blob"), len(data) - 10, 50) == data[-10:]  # fewer at the end
    with storage.open_random(str(tmp_path / "blob")) as stream:
        stream.seek(1000)
        assert stream.read(24) == data[1000:1024]

    reader = storage.RangeReader(str(tmp_path / "blob"), window=32 << 10)
    members = [(512 + i * 1536, 1024) for i in range(60)]  # tar-like: 1 KiB members after 512-byte headers
    assert all(reader.read(offset, size) == data[offset:offset + size] for offset, size in members)
    span = members[-1][0] + 1024 - members[0][0]
    assert reader.gets == -(-span // (32 << 10)) == 3  # one GET per window, not one per member
    reader = storage.RangeReader(str(tmp_path / "blob"), window=32 << 10)
    backwards = list(reversed(members))
    assert all(reader.read(offset, size) == data[offset:offset + size] for offset, size in backwards)
    assert reader.gets == len(members) and len(reader.data) == 1024  # jumps fetch only what they ask


def test_a_forked_process_gets_its_own_s3_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client (and its urllib3 pool of sockets) is per process: a forked DataLoader worker that reused
    its parent's would share open connections with it (tar bytes read as an HTTP status line)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    parent = storage.s3_client()
    assert storage.s3_client() is parent  # cached within a process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: 1 if it got the parent's client object
        os.write(write, b"1" if storage.s3_client() is parent else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"0"
