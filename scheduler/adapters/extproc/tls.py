"""TLS for the ext_proc port: a self-signed certificate made at start (the GIE default), a
certificate/key pair from files (re-read when they change, e.g. a rotated Kubernetes Secret),
or plaintext."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc


@dataclass(frozen=True, slots=True)
class TLSSettings:
    mode: Literal["self_signed", "files", "plaintext"] = "self_signed"
    cert_file: str | None = None
    key_file: str | None = None
    # Subject alternative names of the self-signed certificate.
    hostnames: tuple[str, ...] = ("localhost",)
    ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    valid_days: int = 365

    def __post_init__(self) -> None:
        if self.mode == "files" and not (self.cert_file and self.key_file):
            raise ValueError("TLS mode 'files' needs cert_file and key_file")

    @classmethod
    def plaintext(cls) -> TLSSettings:
        return cls(mode="plaintext")

    @classmethod
    def from_files(cls, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> TLSSettings:
        return cls(mode="files", cert_file=os.fspath(cert_file), key_file=os.fspath(key_file))


def self_signed_certificate(
    hostnames: tuple[str, ...], ip_addresses: tuple[str, ...], valid_days: int
) -> tuple[bytes, bytes]:
    """A fresh P-256 key and a self-signed certificate for it: (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0] if hostnames else "kvsched")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(host) for host in hostnames]
    alt_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate_pem, key_pem


class ServerCredentials:
    """The gRPC credentials for a TLSSettings; ``certificate_pem`` is what clients should trust."""

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self.certificate_pem: bytes | None = None
        # The self-signed key, for a transport that builds its own credentials (native.py).
        self.key_pem: bytes | None = None
        self.credentials: Any = None
        if settings.mode == "plaintext":
            return
        if settings.mode == "self_signed":
            certificate, key = self_signed_certificate(
                settings.hostnames, settings.ip_addresses, settings.valid_days
            )
            self.certificate_pem = certificate
            self.key_pem = key
            self.credentials = grpc.ssl_server_credentials([(key, certificate)])
            return
        assert settings.cert_file is not None and settings.key_file is not None
        self._cert_path = Path(settings.cert_file)
        self._key_path = Path(settings.key_file)
        self._stamp = self._file_stamp()
        initial = self._load()
        # gRPC asks for a new configuration at each handshake; the files are re-read only when
        # their modification times change.
        self.credentials = grpc.dynamic_ssl_server_credentials(initial, self._fetch)

    def _file_stamp(self) -> tuple[int, int]:
        return self._cert_path.stat().st_mtime_ns, self._key_path.stat().st_mtime_ns

    def _load(self) -> Any:
        certificate = self._cert_path.read_bytes()
        key = self._key_path.read_bytes()
        self.certificate_pem = certificate
        return grpc.ssl_server_certificate_configuration([(key, certificate)])

    def _fetch(self) -> Any:
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return None
            configuration = self._load()
        except OSError:
            # Mid-rotation (one file replaced, the other not yet): keep serving the old pair.
            return None
        self._stamp = stamp
        return configuration
