"""Bundle archives: deterministic packing, digest checks, and refusal of hostile archives."""
import gzip
import hashlib
import io
import os
import tarfile

import pytest

from walle.protos import bundle
from walle.protos.bundle import BundleError

FILES = {"task.toml": b'name = "x"\n', "main.py": b"def main(event):\n    return 1\n",
         "lib/util.py": b"X = 1\n", "data/\u00e9t\u00e9.txt": "\u00e9t\u00e9".encode(),
         "deep/" + "d" * 120 + "/f.py": b"Y = 2\n"}


def _evil_tar(add) -> bytes:
    """A gzip'd tar built by `add(tar)`, deliberately outside pack()'s rules."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar)
    return gzip.compress(raw.getvalue())


def _file(tar, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_pack_is_deterministic_and_round_trips():
    a = bundle.pack(FILES)
    b = bundle.pack(dict(reversed(list(FILES.items()))))
    assert a == b
    assert bundle.digest(a) == "sha256:" + hashlib.sha256(a).hexdigest()
    assert bundle.unpack(a, bundle.digest(a)) == FILES
    changed = dict(FILES, **{"main.py": b"def main(event):\n    return 2\n"})
    assert bundle.digest(bundle.pack(changed)) != bundle.digest(a)


def test_pack_zeroes_metadata():
    data = bundle.pack(FILES)
    assert data[4:8] == b"\0\0\0\0"              # gzip mtime
    assert data[3] & 0x08 == 0                    # no FNAME in the gzip header
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(FILES)
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)


def test_empty_file_and_empty_bundle():
    data = bundle.pack({"empty.txt": b""})
    assert bundle.unpack(data, bundle.digest(data)) == {"empty.txt": b""}
    data = bundle.pack({})
    assert bundle.unpack(data, bundle.digest(data)) == {}


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../b", "a//b", "./a", "a\\b", "a\nb", ""])
def test_pack_refuses_unsafe_names(name):
    with pytest.raises(BundleError):
        bundle.pack({name: b"x"})


def test_pack_refuses_file_folder_clash():
    with pytest.raises(BundleError, match="both a file and a folder"):
        bundle.pack({"a": b"1", "a/b": b"2"})


def test_verify():
    data = bundle.pack(FILES)
    bundle.verify(data, bundle.digest(data))
    with pytest.raises(BundleError, match="mismatch"):
        bundle.verify(data + b"\0", bundle.digest(data))
    with pytest.raises(BundleError, match="sha256"):
        bundle.verify(data, "md5:abc")


def test_tampered_bundle_refused():
    data = bytearray(bundle.pack(FILES))
    good = bundle.digest(bytes(data))
    data[len(data) // 2] ^= 0x01
    with pytest.raises(BundleError, match="mismatch"):
        bundle.unpack(bytes(data), good)
    # Even when the attacker also supplies the matching digest, the gzip CRC catches the change.
    with pytest.raises(BundleError):
        bundle.unpack(bytes(data), bundle.digest(bytes(data)))


def _symlink(tar):
    info = tarfile.TarInfo("link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _hardlink(tar):
    _file(tar, "a")
    info = tarfile.TarInfo("b")
    info.type, info.linkname = tarfile.LNKTYPE, "a"
    tar.addfile(info)


def _directory(tar):
    info = tarfile.TarInfo("d")
    info.type = tarfile.DIRTYPE
    tar.addfile(info)


def _fifo(tar):
    info = tarfile.TarInfo("p")
    info.type = tarfile.FIFOTYPE
    tar.addfile(info)


@pytest.mark.parametrize("add, message", [
    (lambda t: _file(t, "../evil"), r"'\.\.'"),
    (lambda t: _file(t, "ok/../../evil"), r"'\.\.'"),
    (lambda t: _file(t, "/etc/evil"), "absolute"),
    (_symlink, "symlink"),
    (_hardlink, "hard link"),
    (_directory, "directory"),
    (_fifo, "special file"),
    (lambda t: (_file(t, "a"), _file(t, "a")), "twice"),
])
def test_hostile_members_refused(add, message):
    data = _evil_tar(add)
    with pytest.raises(BundleError, match=message):
        bundle.unpack(data, bundle.digest(data))


def test_decompression_bomb_refused():
    raw = io.BytesIO()
    big = bundle.MAX_TOTAL_SIZE + 1024 * 1024
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("zeros")
        info.size = big
        tar.addfile(info, io.BytesIO(bytes(big)))
    data = gzip.compress(raw.getvalue())
    assert len(data) < 100_000  # small on the wire, huge when expanded
    with pytest.raises(BundleError, match="more than"):
        bundle.unpack(data, bundle.digest(data))


def test_too_many_members_refused():
    data = _evil_tar(lambda t: [_file(t, f"f{i}") for i in range(bundle.MAX_MEMBERS + 1)])
    with pytest.raises(BundleError, match="more than 1000 files"):
        bundle.unpack(data, bundle.digest(data))
    with pytest.raises(BundleError, match="at most 1000"):
        bundle.pack({f"f{i}": b"" for i in range(bundle.MAX_MEMBERS + 1)})


@pytest.mark.parametrize("data", [b"not gzip at all", gzip.compress(b"not a tar" * 100),
                                  bundle.pack(FILES)[:-20], bundle.pack(FILES) + b"junk"])
def test_garbage_refused(data):
    with pytest.raises(BundleError):
        bundle.unpack(data, bundle.digest(data))


def test_extract_to(tmp_path):
    dest = tmp_path / "out"
    bundle.extract_to(FILES, dest)
    got = {str(p.relative_to(dest)).replace(os.sep, "/"): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == FILES
    assert (dest / "main.py").stat().st_mode & 0o777 == 0o644
    with pytest.raises(BundleError, match="not an empty folder"):
        bundle.extract_to(FILES, dest)
    (tmp_path / "empty").mkdir()
    bundle.extract_to({"a.txt": b"1"}, tmp_path / "empty")
    assert (tmp_path / "empty" / "a.txt").read_bytes() == b"1"


def test_extract_to_refuses_escapes(tmp_path):
    with pytest.raises(BundleError, match=r"'\.\.'"):
        bundle.extract_to({"../evil": b"x"}, tmp_path / "out")
    assert not (tmp_path / "evil").exists()
