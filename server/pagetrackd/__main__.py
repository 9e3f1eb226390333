"""``pagetrackd``: serve KVM page tracking over gRPC until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any, NoReturn

import structlog

from pagetrackd import __version__, gc_policy
from pagetrackd import logging as pt_logging
from pagetrackd.app import Daemon
from pagetrackd.config import DEFAULT_LISTEN, Config, load
from pagetrackd.domain import PageTrackError
from pagetrackd.limits import (
    DEFAULT_HISTORY_BYTES,
    DEFAULT_HISTORY_EVENTS,
    DEFAULT_PLUGIN_FAILURE_LIMIT,
)
from pagetrackd.startup import (
    EXIT_STATUS_HELP,
    ExitStatus,
    StartupError,
    check_listen,
    check_tls,
    check_tokens,
    read_config_file,
    setting_error,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the whole usage) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitStatus.USAGE, f"pagetrackd: {message}; see 'pagetrackd --help'\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pagetrackd",
        description=(
            "Serve Linux KVM's x86 page-track facility (guest write tracking) over gRPC."
            " Settings come from --config (TOML), then PAGETRACK_* environment variables"
            " (e.g. PAGETRACK_LISTEN, PAGETRACK_TOKENS_FILE), then these flags."
        ),
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"pagetrackd {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML file with the settings below")
    p.add_argument(
        "--listen", action="append", metavar="ADDR",
        help=f"HOST:PORT or unix:PATH to serve on; repeatable (default {DEFAULT_LISTEN})",
    )
    p.add_argument("--tokens-file", metavar="FILE",
                   help="TOML file of sha256-hashed bearer tokens; without it one 'default'"
                   " tenant is served, on loopback and unix sockets only")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow listening on a non-loopback address without tokens")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="server private key")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "json", "console"],
                   help="auto = JSON unless stderr is a terminal")
    p.add_argument("--grace", dest="grace_s", type=float, metavar="SECONDS",
                   help="time in-flight calls get on shutdown (default 5)")
    p.add_argument("--history-events", type=int, metavar="N",
                   help=f"events kept per VM for Watch resume (default {DEFAULT_HISTORY_EVENTS})")
    p.add_argument("--history-bytes", type=int, metavar="N",
                   help="bytes of event data kept per VM for resume"
                   f" (default {DEFAULT_HISTORY_BYTES >> 20} MiB)")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on this port (default off)")
    p.add_argument("--metrics-host", metavar="HOST",
                   help="address for metrics (127.0.0.1); another address needs --tokens-file"
                   " (scrapes then send a token of role metrics) or --insecure")
    p.add_argument("--metrics-max-vms", type=int, metavar="N",
                   help="VMs that get their own metric labels; later ones are added up"
                   " under vm=\"_other\" (default 100)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="save VM state here periodically and on SIGTERM; load it at start")
    p.add_argument("--save-interval", dest="save_interval_s", type=float, metavar="SECONDS",
                   help="how often state is saved (default 30)")
    p.add_argument("--durability", choices=["interval", "journal"],
                   help="interval (default): a crash loses what changed since the last save;"
                   " journal: every acknowledged change is on disk before its reply")
    p.add_argument("--health-watchers", type=int, metavar="N",
                   help="most open grpc.health.v1 Health.Watch streams (default 256)")
    p.add_argument("--ready-file", metavar="FILE",
                   help="write the bound addresses (JSON) here once serving")
    p.add_argument("--plugins-allow", metavar="NAME,...",
                   help="third-party plugins (entry points in group pagetrackd.plugins)"
                   " tenants may attach, comma-separated; built-ins are always allowed")
    p.add_argument("--plugin-failure-limit", type=int, metavar="N",
                   help="failed hooks after which a third-party plugin is detached"
                   f" (default {DEFAULT_PLUGIN_FAILURE_LIMIT})")
    p.add_argument("--demo", action="store_true", default=None,
                   help="create a demo VM with tracked pages and a running workload")
    p.add_argument("--stop-on-stdin-eof", action="store_true",
                   help="also stop (as on SIGTERM) when standard input reaches end of file:"
                   " a parent that starts pagetrackd with stdin a pipe it never writes to"
                   " makes the daemon stop when the parent dies, however it dies")
    return p


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` once stdin reaches end of file (its writer, our parent, is gone)."""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            structlog.get_logger("pagetrackd").info("daemon.stdin_closed")
            stop.set()

    try:
        loop.add_reader(fd, readable)
    except PermissionError:  # epoll refuses regular files and /dev/null
        raise StartupError(
            ExitStatus.SETTING,
            "--stop-on-stdin-eof needs standard input to be a pipe, socket or terminal (it is"
            " a file); start pagetrackd with stdin a pipe, or leave the flag out",
        ) from None


async def _serve(config: Config, stop_on_stdin_eof: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if stop_on_stdin_eof:
        _watch_stdin(loop, stop)
    daemon = Daemon(config)
    try:
        await daemon.start()
    except RuntimeError as exc:  # grpc could not bind (another process took the port)
        raise StartupError(
            ExitStatus.LISTEN,
            f"cannot listen on {', '.join(config.listen)}: {exc}; stop the process using"
            " it or choose another address",
        ) from None
    if config.demo:
        from pagetrackd.demo import setup_demo

        setup_demo(daemon.engine)
    await stop.wait()
    structlog.get_logger("pagetrackd").info("daemon.stopping")
    await daemon.stop()
    if daemon.exit_code:
        print("pagetrackd: the final save did not complete; see state.vm_save_failed in the"
              " log", file=sys.stderr)
    return daemon.exit_code


def _configure(args: argparse.Namespace) -> Config:
    """The settings, checked: raises StartupError naming what is wrong."""
    flags: dict[str, Any] = {
        k: v for k, v in vars(args).items() if k not in ("config", "stop_on_stdin_eof")
    }
    if flags.get("listen") is not None:
        flags["listen"] = tuple(flags["listen"])
    if args.config:
        read_config_file(args.config)
    try:
        config = load(args.config, flags=flags)
    except PageTrackError as exc:
        raise setting_error(exc) from None
    check_tokens(config)
    check_tls(config)
    check_listen(config)
    return config


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pagetrackd`` command; returns its exit status (``pagetrackd
    --help`` lists them)."""
    args = _parser().parse_args(argv)
    try:
        config = _configure(args)
    except StartupError as exc:
        print(f"pagetrackd: {exc.message}", file=sys.stderr)
        return exc.status
    json = {"auto": None, "json": True, "console": False}[config.log_format]
    pt_logging.configure(config.log_level, json)
    gc_policy.configure()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # uvloop is not built for every platform
        runner = asyncio.run
    try:
        return int(runner(_serve(config, args.stop_on_stdin_eof)))
    except StartupError as exc:
        print(f"pagetrackd: {exc.message}", file=sys.stderr)
        return exc.status
    except PageTrackError as exc:  # a setting only the daemon could judge (e.g. quotas)
        print(f"pagetrackd: {setting_error(exc).message}", file=sys.stderr)
        return ExitStatus.SETTING
    except OSError as exc:
        print(f"pagetrackd: {exc}", file=sys.stderr)
        return ExitStatus.FAILED


if __name__ == "__main__":
    sys.exit(main())
