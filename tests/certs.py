"""Self-signed certificates for tests: each is its own CA, so a client that
trusts the certificate file trusts the server."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "localhost"
LOOPBACK_NAMES: tuple[x509.GeneralName, ...] = (
    x509.DNSName(HOST),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
)


def self_signed_pem(
    common_name: str, names: Sequence[x509.GeneralName] = LOOPBACK_NAMES
) -> tuple[bytes, bytes]:
    """(certificate, PKCS#8 key), PEM: valid from yesterday to tomorrow for ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def self_signed(folder: Path, common_name: str = HOST) -> tuple[Path, Path]:
    """cert.pem and key.pem in ``folder``, valid for localhost and 127.0.0.1."""
    cert, key = self_signed_pem(common_name)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    return cert_path, key_path
