"""Per-session TLS credentials: a fresh self-signed certificate, written 0600 into the session directory.

Only holders of these files (the notebook and its workers, same user, shared home) can talk to
the scheduler; a client without them, or with another session's, is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from distributed.security import Security


@dataclass
class SessionCredentials:
    """The files and the Security object built from them."""

    directory: Path
    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path) -> "SessionCredentials":
        """Generate a key and certificate and write them as 0600 files in a new 0700 ``directory``."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        tmp = Security.temporary()  # in-memory PEM key and self-signed cert, via cryptography
        files = {"ca.pem": tmp.tls_ca_file, "cert.pem": tmp.tls_client_cert, "key.pem": tmp.tls_client_key}
        for name, pem in files.items():
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(pem)
        return cls(directory, directory / "ca.pem", directory / "cert.pem", directory / "key.pem")

    def security(self) -> Security:
        """A Security for every role (client, scheduler, worker) that requires encryption."""
        ca, cert, key = str(self.ca_file), str(self.cert_file), str(self.key_file)
        return Security(
            require_encryption=True, tls_ca_file=ca,
            tls_client_cert=cert, tls_client_key=key,
            tls_scheduler_cert=cert, tls_scheduler_key=key,
            tls_worker_cert=cert, tls_worker_key=key,
        )

    def files(self) -> list[Path]:
        return [self.ca_file, self.cert_file, self.key_file]

    def delete(self) -> None:
        """Remove the key files and their directory."""
        for p in self.files():
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        try:
            self.directory.rmdir()
        except OSError:
            pass
