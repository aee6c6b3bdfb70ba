"""The keys and certificates a Flower federation runs on: a private CA, the SuperLink's TLS
certificate, and one key pair per site for SuperNode authentication (``cryptography``; a
hospital with its own PKI supplies its CA or the SuperLink's certificate instead)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedoap.federation.flower_launch import TLSFiles


def _write_private(path: Path, data: bytes) -> None:
    """A private key, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(
    cert: Path, key: Path, name: str = "fedoap CA", days: int = 365
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA (EC P-384): its certificate at ``cert``, its key at ``key``."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert.parent.mkdir(parents=True, exist_ok=True)
    cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(key, _pem_key(ca_key))
    return ca, ca_key


def load_ca(cert: Path, key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A supplied CA's certificate and (EC) key."""
    ca = x509.load_pem_x509_certificate(cert.read_bytes())
    ca_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key}: an EC private key is expected")
    return ca, ca_key


def make_server_cert(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    host: str,
    cert: Path,
    key: Path,
    days: int = 365,
) -> None:
    """The SuperLink's certificate for ``host`` (a DNS name or an IP address), signed by the
    CA; ``localhost`` is always among its names."""
    now = dt.datetime.now(dt.UTC)
    server_key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    built = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert.parent.mkdir(parents=True, exist_ok=True)
    cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
    _write_private(key, _pem_key(server_key))


def make_tls(folder: Path, host: str = "127.0.0.1") -> TLSFiles:
    """A throw-away CA and a SuperLink certificate for ``host`` in ``folder``."""
    files = TLSFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    ca, ca_key = make_ca(files.ca_cert, folder / "ca.key", "fedoap test CA", days=2)
    make_server_cert(ca, ca_key, host, files.server_cert, files.server_key, days=2)
    return files


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair for SuperNode authentication: (private key, OpenSSH format; public key,
    OpenSSH format), as ``ssh-keygen -t ecdsa -b 384`` writes them."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public
