"""Task bundle archive: a deterministic tar.gz of a task folder, named by the sha256 of its bytes.

The format is part of the wire contract: the platform packs, device hosts fetch a bundle by digest and
unpack it. Packing is deterministic (sorted names, zeroed metadata, fixed gzip header) so the digest is
a pure function of the files. Unpacking treats the archive as hostile: the digest is checked before
anything is parsed, only plain files with clean relative names are accepted, and sizes are capped
while decompressing so a small archive cannot expand into a huge one.

This module must not import walle.platform or walle.device_host: both sides depend on it.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
import zlib
from pathlib import Path

DIGEST_PREFIX = "sha256:"
MAX_MEMBERS = 1000
MAX_TOTAL_SIZE = 16 * 1024 * 1024           # sum of file sizes
MAX_PATH_BYTES = 240
# Tar adds headers (and pax records for long or non-ASCII names) and record padding on top of file data.
MAX_TAR_SIZE = MAX_TOTAL_SIZE + MAX_MEMBERS * 2048 + 64 * 1024

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class BundleError(ValueError):
    """A bundle is malformed, tampered with, unsafe, or too large."""


def path_problem(name: object) -> str | None:
    """Why `name` is not a safe relative file path inside a bundle, or None if it is."""
    if not isinstance(name, str):
        return f"path must be a string (got {type(name).__name__})"
    if not name:
        return "path is empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"path is longer than {MAX_PATH_BYTES} bytes"
    if _CONTROL_RE.search(name):
        return "path contains a control character"
    if "\\" in name:
        return "path contains a backslash"
    if name.startswith("/"):
        return "path is absolute"
    parts = name.split("/")
    if ".." in parts:
        return "path contains '..'"
    if any(p in ("", ".") for p in parts):
        return "path has an empty or '.' component"
    return None


def _check_names(names: list[str]) -> None:
    """Every name is clean, unique, and no name is both a file and a folder of another."""
    seen: set[str] = set()
    for name in names:
        problem = path_problem(name)
        if problem:
            raise BundleError(f"bundle member {name!r}: {problem}")
        if name in seen:
            raise BundleError(f"bundle member {name!r} appears twice")
        seen.add(name)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in seen:
                raise BundleError(f"bundle member {parent!r} is both a file and a folder (of {name!r})")


def _check_sizes(sizes: list[int]) -> None:
    if len(sizes) > MAX_MEMBERS:
        raise BundleError(f"bundle has {len(sizes)} files; at most {MAX_MEMBERS} are allowed")
    total = sum(sizes)
    if total > MAX_TOTAL_SIZE:
        raise BundleError(f"bundle files total {total} bytes; at most {MAX_TOTAL_SIZE} are allowed")


def digest(data: bytes) -> str:
    """Content address of a bundle: "sha256:<hex>"."""
    return DIGEST_PREFIX + hashlib.sha256(data).hexdigest()


def verify(data: bytes, expected_digest: str) -> None:
    """Raise BundleError unless `data` hashes to `expected_digest`."""
    if not isinstance(expected_digest, str) or not _DIGEST_RE.match(expected_digest):
        raise BundleError(f"bundle digest must look like 'sha256:<64 lowercase hex>' (got {expected_digest!r})")
    actual = digest(data)
    if actual != expected_digest:
        raise BundleError(f"bundle digest mismatch: expected {expected_digest}, got {actual}")


def pack(files: dict[str, bytes]) -> bytes:
    """Deterministic tar.gz of `files` (relative path -> content): same files, same bytes."""
    names = sorted(files)
    _check_names(names)
    _check_sizes([len(files[n]) for n in names])
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for name in names:
            data = files[name]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise BundleError(f"bundle member {name!r}: content must be bytes (got {type(data).__name__})")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(bytes(data)))
    tar_bytes = raw.getvalue()
    if len(tar_bytes) > MAX_TAR_SIZE:
        raise BundleError(f"bundle archive would be {len(tar_bytes)} bytes uncompressed; at most {MAX_TAR_SIZE}")
    # mtime=0 and no file name in the gzip header: nothing but the content reaches the bytes.
    return gzip.compress(tar_bytes, compresslevel=9, mtime=0)


def _gunzip_capped(data: bytes) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_TAR_SIZE + 1)
    except zlib.error as e:
        raise BundleError(f"bundle is not valid gzip: {e}") from None
    if len(out) > MAX_TAR_SIZE or d.unconsumed_tail:
        raise BundleError(f"bundle expands to more than {MAX_TAR_SIZE} bytes")
    if not d.eof:
        raise BundleError("bundle gzip stream is truncated")
    if d.unused_data:
        raise BundleError("bundle has trailing data after the gzip stream")
    return out


def unpack(data: bytes, expected_digest: str) -> dict[str, bytes]:
    """Verify the digest, then read the archive's files (relative path -> content), refusing anything unsafe."""
    verify(data, expected_digest)
    raw = _gunzip_capped(data)
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", encoding="utf-8") as tar:
            for member in tar:
                if len(files) >= MAX_MEMBERS:
                    raise BundleError(f"bundle has more than {MAX_MEMBERS} files")
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    kind = ("symlink" if member.issym() else "hard link" if member.islnk()
                            else "directory" if member.isdir() else "special file")
                    raise BundleError(f"bundle member {member.name!r} is a {kind}; only regular files are allowed")
                problem = path_problem(member.name)
                if problem:
                    raise BundleError(f"bundle member {member.name!r}: {problem}")
                if member.name in files:
                    raise BundleError(f"bundle member {member.name!r} appears twice")
                total += member.size
                if total > MAX_TOTAL_SIZE:
                    raise BundleError(f"bundle files total more than {MAX_TOTAL_SIZE} bytes")
                f = tar.extractfile(member)
                content = f.read() if f is not None else b""
                if len(content) != member.size:
                    raise BundleError(f"bundle member {member.name!r} is truncated")
                files[member.name] = content
    except tarfile.TarError as e:
        raise BundleError(f"bundle is not a valid tar archive: {e}") from None
    _check_names(list(files))
    return files


def extract_to(files: dict[str, bytes], dest_dir: str | os.PathLike) -> Path:
    """Write `files` under `dest_dir`, which must not exist yet (or be an empty folder).

    Files are created exclusively and never through symlinks, so nothing can land outside `dest_dir`.
    """
    dest = Path(dest_dir)
    _check_names(sorted(files))
    if dest.is_symlink():
        raise BundleError(f"extract destination {str(dest)!r} is a symlink")
    if dest.exists():
        if not dest.is_dir() or any(dest.iterdir()):
            raise BundleError(f"extract destination {str(dest)!r} already exists and is not an empty folder")
    else:
        dest.mkdir(parents=True)
    root = dest.resolve()
    for name in sorted(files):
        target = root.joinpath(*name.split("/"))
        if root not in target.parents:  # belt and braces after path_problem
            raise BundleError(f"bundle member {name!r} escapes the destination")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(files[name])
    return dest


def release_statement(digest: str, release_id: str, config_json: str) -> str:
    """What the platform signs for an active task: the bundle digest, plus the release id and its
    task config when the task has config. Whether a task has config is fixed by its task.toml, i.e. by
    the digest, so a digest-only signature can never stand in for a task that has config; the release
    id binds the config to the release a device reports its runs under."""
    if not config_json:
        return digest
    return f"{digest}\nrelease {release_id}\nconfig {config_json}"


def verify_signature(public_key: bytes, digest: str, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature by `public_key` (32 raw bytes) over `digest`,
    a bundle digest string ("sha256:<hex>") or a release_statement: how a device knows its platform
    released this bundle (with this config)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_key).verify(signature, digest.encode())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
