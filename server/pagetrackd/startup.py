"""What can stop pagetrackd from starting, each with its own exit status and a one-line
message that names the problem and the fix (no traceback)."""

from __future__ import annotations

import enum
import errno
import socket
import ssl
import tomllib
from pathlib import Path

from pagetrackd.auth import Authenticator
from pagetrackd.config import Config, parse_listen
from pagetrackd.domain import PageTrackError


class ExitStatus(enum.IntEnum):
    """pagetrackd's exit statuses (listed in ``pagetrackd --help``)."""

    OK = 0  #: stopped by SIGTERM or SIGINT (or stdin closed, with --stop-on-stdin-eof)
    FAILED = 1  #: failed while serving, or the final save did not complete
    USAGE = 2  #: a flag is unknown or lacks its value (argparse)
    CONFIG_FILE = 3  #: the --config file cannot be read or is not valid TOML
    SETTING = 4  #: a setting (file, PAGETRACK_* variable or flag) has a wrong value
    TOKENS_FILE = 5  #: the tokens file cannot be read or is malformed
    TLS_FILES = 6  #: the TLS certificate or key cannot be read, parsed or paired
    LISTEN = 7  #: an address to serve on (or the metrics port) cannot be bound


#: The table for ``pagetrackd --help`` and docs/operations.md.
EXIT_STATUS_HELP = """exit status:
  0  stopped cleanly (SIGTERM, SIGINT, or stdin closed with --stop-on-stdin-eof)
  1  failed while serving, or the final save did not complete (see state.vm_save_failed)
  2  bad flags: unknown flag, or a flag without its value
  3  the --config file cannot be read or is not valid TOML
  4  a setting has a wrong value (config file, PAGETRACK_* variable or flag)
  5  the tokens file cannot be read or is malformed
  6  the TLS certificate or key cannot be read, parsed, or do not belong together
  7  an address to serve on, or the metrics port, is in use or cannot be bound"""


class StartupError(Exception):
    """pagetrackd cannot start: ``message`` says why and what to do."""

    def __init__(self, status: ExitStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reason(exc: BaseException) -> str:
    """An OSError's reason without the errno prefix; anything else as it prints."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_config_file(path: str) -> None:
    """Fail with CONFIG_FILE unless ``path`` can be read and parses as TOML."""
    try:
        tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise StartupError(
            ExitStatus.CONFIG_FILE,
            f"cannot read config file {path}: {_reason(exc)}; check the path given to --config"
            " and that pagetrackd may read it",
        ) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StartupError(
            ExitStatus.CONFIG_FILE,
            f"config file {path} is not valid TOML: {_reason(exc)}; fix that line (see"
            " deploy/pagetrack.toml for an example)",
        ) from None


def setting_error(exc: PageTrackError) -> StartupError:
    """A refused setting as a StartupError."""
    return StartupError(
        ExitStatus.SETTING,
        f"{exc}; correct it in the config file, the PAGETRACK_* variable or the flag",
    )


def check_tokens(config: Config) -> None:
    """Fail with TOKENS_FILE unless the tokens file (if any) loads."""
    if not config.tokens_file:
        return
    path = Path(config.tokens_file)
    try:
        path.read_bytes()
    except OSError as exc:
        raise StartupError(
            ExitStatus.TOKENS_FILE,
            f"cannot read tokens file {path}: {_reason(exc)}; check --tokens-file and that"
            " pagetrackd may read it",
        ) from None
    try:
        Authenticator.from_file(path)
    except (PageTrackError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise StartupError(
            ExitStatus.TOKENS_FILE,
            f"{str(exc).splitlines()[0]}; each [[token]] needs sha256 = \"<hex sha256 of the"
            " token>\", tenant = \"NAME\" and optionally role = \"tenant\" or \"admin\"",
        ) from None


def check_tls(config: Config) -> None:
    """Fail with TLS_FILES unless the certificate and key read, parse and match."""
    if not config.tls_cert:
        return
    for what, name in (("certificate", config.tls_cert), ("key", config.tls_key)):
        try:
            Path(name).read_bytes()
        except OSError as exc:
            raise StartupError(
                ExitStatus.TLS_FILES,
                f"cannot read TLS {what} {name}: {_reason(exc)}; check --tls-cert/--tls-key"
                " and that pagetrackd may read them",
            ) from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            config.tls_cert, config.tls_key
        )
    except ssl.SSLError as exc:
        raise StartupError(
            ExitStatus.TLS_FILES,
            f"TLS certificate {config.tls_cert} and key {config.tls_key} are not a usable PEM"
            f" pair ({exc.reason or exc}); give the PEM certificate to --tls-cert and its"
            " private key to --tls-key",
        ) from None


def _in_use(what: str, addr: str) -> StartupError:
    return StartupError(
        ExitStatus.LISTEN,
        f"cannot listen on {addr} for {what}: the address is in use (another pagetrackd?);"
        " stop that process or choose another port",
    )


def _bind_error(what: str, addr: str, exc: OSError) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        return _in_use(what, addr)
    return StartupError(
        ExitStatus.LISTEN,
        f"cannot listen on {addr} for {what}: {_reason(exc)}; choose an address this"
        " machine has and a port pagetrackd may use (1024 and up without privileges)",
    )


def check_tcp(what: str, host: str, port: int) -> None:
    """Fail with LISTEN if ``host:port`` cannot be bound now (port 0 always can)."""
    if port == 0:
        return
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(
            ExitStatus.LISTEN,
            f"cannot listen on {addr} for {what}: {exc.strerror}; use an IP address or a"
            " host name this machine resolves",
        ) from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it
        try:
            s.bind(sockaddr)
        except OSError as exc:
            raise _bind_error(what, addr, exc) from None


def check_unix(path: str) -> None:
    """Fail with LISTEN if a live server owns the socket ``path`` (a stale socket file,
    left by a daemon that was killed, may be replaced)."""
    p = Path(path)
    if not p.exists():
        if not p.parent.is_dir():
            raise StartupError(
                ExitStatus.LISTEN,
                f"cannot listen on unix:{path}: directory {p.parent} does not exist; create"
                " it or choose another path",
            )
        return
    if not p.is_socket():
        raise StartupError(
            ExitStatus.LISTEN,
            f"cannot listen on unix:{path}: a file that is not a socket is there; remove it"
            " or choose another path",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return  # nobody answers: stale
    raise _in_use("gRPC", f"unix:{path}")


def check_listen(config: Config) -> None:
    """Fail with LISTEN if any gRPC address or the metrics port cannot be bound."""
    for addr in config.listen:
        host, port = parse_listen(addr)
        if host == "unix":
            check_unix(port)
        else:
            check_tcp("gRPC", host, int(port))
    if config.metrics_port:
        check_tcp("metrics", config.metrics_host, config.metrics_port)


__all__ = [
    "EXIT_STATUS_HELP",
    "ExitStatus",
    "StartupError",
    "check_listen",
    "check_tls",
    "check_tokens",
    "read_config_file",
    "setting_error",
]
