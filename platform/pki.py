"""The platform's keys: a private CA, a server certificate it signs (TLS on every gRPC channel), and
an Ed25519 key that signs every released bundle digest. `walle platform init` creates them in
<data dir>/pki/; private keys are written with mode 0600.

Devices pin the CA certificate and the bundle public key when they enroll, so only this platform
can talk to them and only bundles it signed are installed."""
from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import socket
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import FailedPrecondition

CA_DAYS = 3650
SERVER_DAYS = 825


def _write(path: pathlib.Path, data: bytes, private: bool) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "walle"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class PlatformKeys:
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    signing_key: ed25519.Ed25519PrivateKey

    @property
    def bundle_public_key(self) -> bytes:
        return self.signing_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, digest: str) -> bytes:
        return self.signing_key.sign(digest.encode())


def init(data_dir: str | os.PathLike, hosts: list[str] | None = None, *, force: bool = False) -> PlatformKeys:
    """Create the CA, the server certificate (for `hosts`, default localhost/127.0.0.1/::1 and this
    machine's name) and the bundle-signing key. Refuses to overwrite existing keys unless forced:
    enrolled devices pinned them."""
    d = pathlib.Path(data_dir) / "pki"
    if (d / "ca.pem").exists() and not force:
        raise FailedPrecondition(f"{d} already has keys (devices pinned them); pass --force to replace them")
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("walle platform CA")).issuer_name(_name("walle platform CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    hosts = hosts or ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    sans = []
    for h in dict.fromkeys(hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
              .add_extension(x509.SubjectAlternativeName(sans), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    signing = ed25519.Ed25519PrivateKey.generate()
    _write(d / "ca-key.pem", _pem_key(ca_key), True)
    _write(d / "server-key.pem", _pem_key(server_key), True)
    _write(d / "bundle-signing-key.pem", _pem_key(signing), True)
    _write(d / "server.pem", server.public_bytes(serialization.Encoding.PEM), False)
    _write(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), False)
    return load(data_dir)


def exists(data_dir: str | os.PathLike) -> bool:
    return (pathlib.Path(data_dir) / "pki" / "ca.pem").exists()


def load(data_dir: str | os.PathLike) -> PlatformKeys:
    d = pathlib.Path(data_dir) / "pki"
    try:
        signing = serialization.load_pem_private_key((d / "bundle-signing-key.pem").read_bytes(), None)
        return PlatformKeys((d / "ca.pem").read_bytes(), (d / "server.pem").read_bytes(),
                            (d / "server-key.pem").read_bytes(), signing)
    except FileNotFoundError as e:
        raise FailedPrecondition(f"platform keys missing ({e.filename}): run `walle platform init --data-dir "
                                 f"{pathlib.Path(data_dir)}` first, or serve with --insecure") from None
