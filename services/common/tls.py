"""TLS (optionally mutual) for every gRPC hop, configured from flags.

Plaintext is the default (a local deployment on loopback); ``create_server``
logs it as such. With ``--tls-cert/--tls-key`` a server listens with TLS;
with ``--tls-ca`` a process verifies the servers it calls against that CA;
``--tls-client-auth`` makes a server require (and verify against the CA) a
client certificate, and makes the process present its own certificate when
it calls others (mutual TLS). One certificate per process serves both ends
(``deploy.certs`` issues certificates valid for serverAuth and clientAuth).

A process installs its ``TlsConfig`` once in ``main`` (``install``); the
server builder and ``open_channel`` read it unless given one explicitly, so
that the frontend's instance and coder channels, the load generator's
channels and the runner's status probes all follow the same flags. Nothing
is read at import.

Flags (``add_arguments``)::

    --tls-cert PEM        this process's certificate chain (server, and client under mTLS)
    --tls-key PEM         its private key
    --tls-ca PEM          CA bundle: verify servers called (and clients, with --tls-client-auth)
    --tls-client-auth     mutual TLS: require client certificates; present ours when calling
    --tls-server-name N   expected name in servers' certificates (default: the target host)
"""

import pathlib
from dataclasses import dataclass

from services.common.cli import UsageError


class TlsError(UsageError):
    """Bad TLS flags or unreadable certificate files: a usage mistake (one line, exit 2)."""


@dataclass(frozen=True)
class TlsConfig:
    """Paths of the PEM files; all None = plaintext."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_auth: bool = False
    server_name: str | None = None

    @property
    def server_enabled(self):
        return bool(self.cert)

    @property
    def client_enabled(self):
        return bool(self.ca)

    def check(self):
        """Raises TlsError naming the first problem; returns self."""
        if bool(self.cert) != bool(self.key):
            raise TlsError("--tls-cert and --tls-key go together")
        if self.client_auth and not (self.ca and self.cert):
            raise TlsError("--tls-client-auth needs --tls-ca, --tls-cert and --tls-key")
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path and not pathlib.Path(path).is_file():
                raise TlsError(f"{flag} {path}: no such file")
        return self

    def _read(self, path):
        return pathlib.Path(path).read_bytes() if path else None

    def server_credentials(self):
        import grpc

        return grpc.ssl_server_credentials(
            [(self._read(self.key), self._read(self.cert))],
            root_certificates=self._read(self.ca) if self.client_auth else None,
            require_client_auth=self.client_auth,
        )

    def channel_credentials(self):
        import grpc

        mutual = self.client_auth and self.cert
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca),
            private_key=self._read(self.key) if mutual else None,
            certificate_chain=self._read(self.cert) if mutual else None,
        )

    def channel_options(self):
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def argv(self):
        """The flags that reproduce this config (for launching children)."""
        out = []
        for flag, value in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca),
                            ("--tls-server-name", self.server_name)):
            if value:
                out += [flag, str(value)]
        if self.client_auth:
            out.append("--tls-client-auth")
        return out

    def describe(self):
        if not (self.server_enabled or self.client_enabled):
            return "plaintext"
        return "mutual TLS" if self.client_auth else "TLS"


PLAINTEXT = TlsConfig()
_installed = PLAINTEXT


def install(cfg):
    """Makes ``cfg`` this process's TLS config (called once by ``main``)."""
    global _installed
    _installed = cfg or PLAINTEXT


def current():
    """The installed config (plaintext unless ``install`` was called)."""
    return _installed


def add_arguments(parser):
    """Adds the ``--tls-*`` flags to an argparse parser."""
    g = parser.add_argument_group("TLS (default: plaintext)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain of this process (enables TLS serving)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", default=None, help="PEM CA bundle to verify servers (and clients under mTLS)")
    g.add_argument("--tls-client-auth", action="store_true",
                   help="mutual TLS: require client certificates; present --tls-cert when calling")
    g.add_argument("--tls-server-name", default=None,
                   help="name expected in servers' certificates (default: the target host)")
    return g


def from_args(args):
    """``TlsConfig`` from parsed ``add_arguments`` flags; TlsError on mistakes."""
    return TlsConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                     client_auth=args.tls_client_auth, server_name=args.tls_server_name).check()
