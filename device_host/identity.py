"""Who this device is: its credential file (device id, bearer token, platform address) and the
attributes it reports to the platform, from which hit rules decide what it receives.

The credential file is the one `walle device enroll --out FILE` writes: JSON with `device_id`,
`token` and `platform`, mode 0600. This module knows only the wire contract (walle.protos).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
from dataclasses import dataclass
from typing import Iterable, Mapping

import grpc

from walle.protos import device_pb2

HOST_VERSION = "0.1.0"
CREDENTIALS_FILE = "credentials.json"

# Attributes a device may set itself; device_id comes from the credential, host_version and
# installed from the host.
ATTR_FIELDS = tuple(f.name for f in device_pb2.DeviceInfo.DESCRIPTOR.fields
                    if f.name not in ("device_id", "host_version", "installed"))
_TAG_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class IdentityError(ValueError):
    """A credential file or an attribute is missing or malformed; the message names which."""


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying the device credential."""
    return (("authorization", f"Bearer {token}"),)


@dataclass(frozen=True)
class Credentials:
    device_id: str
    token: str
    platform: str = ""
    ca_pem: str = ""             # the platform CA pinned at enrollment: TLS is checked against it
    bundle_public_key: str = ""  # hex Ed25519 key pinned at enrollment: bundles must be signed by it
    user_id: str = ""            # the user the platform bound this device to at enrollment

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer_metadata(self.token)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write atomically with mode 0600 (the token is a secret). An identical file is left as it is, so
        starting again with the same credential writes nothing (and works on a full disk)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"device_id": self.device_id, "token": self.token, "platform": self.platform,
                           "ca_pem": self.ca_pem, "bundle_public_key": self.bundle_public_key,
                           "user_id": self.user_id})
        try:
            if path.read_text() == text and (path.stat().st_mode & 0o777) == 0o600:
                return path
        except (OSError, UnicodeDecodeError):
            pass
        fd, tmp = tempfile.mkstemp(prefix=".cred-", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Credentials":
        path = pathlib.Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise IdentityError(f"credential file {str(path)!r} does not exist; enroll the device first "
                                "(walle device enroll --out FILE)") from None
        except ValueError as e:
            raise IdentityError(f"credential file {str(path)!r} is not JSON: {e}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: object, source: str = "credentials") -> "Credentials":
        if not isinstance(data, dict):
            raise IdentityError(f"{source}: expected a JSON object with device_id and token")
        for key in ("device_id", "token"):
            if not isinstance(data.get(key), str) or not data.get(key):
                raise IdentityError(f"{source}: field {key!r} is missing or not a non-empty string")
        platform = data.get("platform") or ""
        if not isinstance(platform, str):
            raise IdentityError(f"{source}: field 'platform' must be a string")
        pinned = {}
        for key in ("ca_pem", "bundle_public_key", "user_id"):
            value = data.get(key) or ""
            if not isinstance(value, str):
                raise IdentityError(f"{source}: field {key!r} must be a string")
            pinned[key] = value
        if pinned["bundle_public_key"]:
            try:
                if len(bytes.fromhex(pinned["bundle_public_key"])) != 32:
                    raise ValueError
            except ValueError:
                raise IdentityError(f"{source}: bundle_public_key must be 64 hex characters (an Ed25519 key)") from None
        return cls(data["device_id"], data["token"].strip(), platform, **pinned)

    def channel(self, address: str = "", options: list | None = None) -> grpc.Channel:
        """A channel to the platform: TLS checked against the pinned CA; plaintext only for a device
        enrolled with a platform that had no keys (--insecure)."""
        address = address or self.platform
        if self.ca_pem:
            creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem.encode())
            return grpc.secure_channel(address, creds, options=options)
        return grpc.insecure_channel(address, options=options)


def credentials_path(data_dir: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(data_dir) / CREDENTIALS_FILE


def parse_attrs(text: str) -> dict[str, object]:
    """`user_id=u1,app_version=2.3.0,os=android,tags=a|b` -> {"user_id": "u1", ..., "tags": ["a", "b"]}."""
    attrs: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        if "=" not in part:
            raise IdentityError(f"--attrs: {part!r} is not KEY=VALUE")
        key, value = (s.strip() for s in part.split("=", 1))
        attrs[key] = [t for t in value.split("|") if t] if key == "tags" else value
    return check_attrs(attrs)


def check_attrs(attrs: Mapping[str, object]) -> dict[str, object]:
    """Validate attribute names and value types; returns a clean copy."""
    out: dict[str, object] = {}
    for key, value in attrs.items():
        if key not in ATTR_FIELDS:
            raise IdentityError(f"unknown device attribute {key!r}; known: {', '.join(sorted(ATTR_FIELDS))}")
        if key == "tags":
            tags = [value] if isinstance(value, str) else value
            if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
                raise IdentityError(f"attribute 'tags' must be a list of strings (got {value!r})")
            for t in tags:
                if not _TAG_RE.match(t):
                    raise IdentityError(f"tag {t!r} is invalid: 1-64 letters, digits, '_', '.', ':' or '-'")
            out[key] = list(tags)
        else:
            if not isinstance(value, str):
                raise IdentityError(f"attribute {key!r} must be a string (got {type(value).__name__})")
            if len(value) > 256:
                raise IdentityError(f"attribute {key!r} is longer than 256 characters")
            out[key] = value
    return out


def device_info(attrs: Mapping[str, object], device_id: str = "", installed: Iterable[str] = ()) -> device_pb2.DeviceInfo:
    """The DeviceInfo a device sends: its attributes, this host's version and its installed tasks."""
    attrs = check_attrs(attrs)
    info = device_pb2.DeviceInfo(device_id=device_id, host_version=HOST_VERSION)
    for key, value in attrs.items():
        if key == "tags":
            info.tags.extend(value)  # type: ignore[arg-type]
        else:
            setattr(info, key, value)
    info.installed.extend(sorted(installed))
    return info
