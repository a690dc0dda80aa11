"""A private CA and certificates for a deployment's gRPC hops.

``python -m deploy.certs --out DIR [--hosts 127.0.0.1,localhost,...]`` writes::

    DIR/ca.pem, DIR/ca.key          the CA (keep ca.key private; 0600)
    DIR/node.pem, DIR/node.key      services: frontend, model servers, coder, load generators
    DIR/client.pem, DIR/client.key  an outside client (serverAuth not granted)

Every node certificate carries the given hosts as subject alternative names
(IP addresses as IP SANs) and is valid for serverAuth and clientAuth, so one
certificate serves a process both as server and, under mutual TLS, as
client. Keys are ECDSA P-256. Then start every service with::

    --tls-cert DIR/node.pem --tls-key DIR/node.key --tls-ca DIR/ca.pem [--tls-client-auth]
"""

import datetime
import ipaddress
import os
import pathlib
import sys
from dataclasses import dataclass

from services.common import cli

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class CertSet:
    """Paths of the files ``make_certs`` wrote."""

    ca: str
    ca_key: str
    node_cert: str
    node_key: str
    client_cert: str
    client_key: str

    def node_tls(self, client_auth=False):
        from services.common.tls import TlsConfig

        return TlsConfig(cert=self.node_cert, key=self.node_key, ca=self.ca, client_auth=client_auth)

    def client_tls(self, client_auth=False):
        from services.common.tls import TlsConfig

        if client_auth:
            return TlsConfig(cert=self.client_cert, key=self.client_key, ca=self.ca, client_auth=True)
        return TlsConfig(ca=self.ca)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path, key):
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path, cert):
    from cryptography.hazmat.primitives import serialization

    pathlib.Path(path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _san(hosts):
    from cryptography import x509

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_certs(out_dir, hosts=DEFAULT_HOSTS, *, days=30, name="parm"):
    """Writes a CA, a node and a client certificate to ``out_dir``; returns ``CertSet``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise ValueError("no hosts for the certificates")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=days)

    def subject(cn):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = _key()
    ca_name = subject(f"{name} private CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn, usages, with_san):
        key = _key()
        b = (x509.CertificateBuilder().subject_name(subject(cn)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(until)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if with_san:
            b = b.add_extension(_san(hosts), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    node_key, node = leaf(f"{name} node", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                          True)
    client_key, client = leaf(f"{name} client", [ExtendedKeyUsageOID.CLIENT_AUTH], False)
    paths = CertSet(*(str(out / n) for n in ("ca.pem", "ca.key", "node.pem", "node.key",
                                              "client.pem", "client.key")))
    _write_cert(paths.ca, ca)
    _write_key(paths.ca_key, ca_key)
    _write_cert(paths.node_cert, node)
    _write_key(paths.node_key, node_key)
    _write_cert(paths.client_cert, client)
    _write_key(paths.client_key, client_key)
    return paths


PROG = "python -m deploy.certs"


def _main(argv):
    p = cli.ArgumentParser(prog=PROG, description="Make a private CA and certificates for TLS.")
    p.add_argument("--out", required=True, help="directory to write the PEM files to")
    p.add_argument("--hosts", default=",".join(DEFAULT_HOSTS),
                   help="comma-separated IPs/names the services are reached at (SANs of node.pem)")
    p.add_argument("--days", type=int, default=30, help="validity, days")
    a = p.parse_args(argv)
    if a.days < 1:
        raise cli.UsageError(f"--days {a.days} must be >= 1")
    hosts = [h.strip() for h in a.hosts.split(",") if h.strip()]
    if not hosts:
        raise cli.UsageError("--hosts names no host")
    certs = make_certs(a.out, hosts, days=a.days)
    print(f"wrote {certs.ca}, {certs.node_cert}, {certs.client_cert} (and keys) for hosts {a.hosts}")
    print(f"services: --tls-cert {certs.node_cert} --tls-key {certs.node_key} --tls-ca {certs.ca}"
          " [--tls-client-auth]")


def main(argv=None):
    # make_certs raises ValueError only for what the flags gave it (hosts, days)
    return cli.run_main(_main, argv, prog=PROG, usage_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
