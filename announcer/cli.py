"""The command line: parse, build the config, hand over. No logic here."""

from __future__ import annotations

import enum
import os
import sys
from typing import Annotated, Any

import typer

from announcer import __version__
from announcer.checks import KINDS
from announcer.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=(
        "Keep a service's record in etcd while its health checks pass.\n\n"
        "`announcer [OPTIONS]` runs the agent until SIGTERM/SIGINT; "
        "`announcer check [OPTIONS]` runs the checks once and shows what would be registered.\n\n"
        "Every option can also be set as ANNOUNCER_<NAME> (e.g. ANNOUNCER_SERVICE) or in the "
        "TOML file given with --config; flags win over the environment, which wins over the file."
    ),
)


class Mode(enum.StrEnum):
    RUN = "run"
    CHECK = "check"


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"announcer {__version__}\n")
        raise typer.Exit


Text = str | None
CHECK_HELP = (
    "Health check, repeatable; all must pass. Kinds: " + ", ".join(sorted(KINDS)) + ". "
    "'http' and 'tcp' alone mean the announced ip:port; {ip} and {port} are filled in. "
    "[default: http]"
)


@app.command()
def main_command(
    mode: Annotated[Mode, typer.Argument(help="run (the default) or check once")] = Mode.RUN,
    service: Annotated[Text, typer.Option(help="Service name, part of the key.")] = None,
    port: Annotated[Text, typer.Option(help="Announced port, 1-65535.")] = None,
    ip: Annotated[
        Text,
        typer.Option(
            help="Announced IPv4 [default: $COREOS_PUBLIC_IPV4, $COREOS_PRIVATE_IPV4, the host's primary address]."
        ),
    ] = None,
    hostname: Annotated[Text, typer.Option(help="The record's host field [default: the host name].")] = None,
    key: Annotated[
        Text,
        typer.Option(
            help="Key template with {service} {ip} {port} {hostname} [default: /services/{service}/{ip}:{port}]."
        ),
    ] = None,
    meta: Annotated[list[str] | None, typer.Option(help="Extra record field KEY=VALUE, repeatable.")] = None,
    check: Annotated[list[str] | None, typer.Option(help=CHECK_HELP)] = None,
    interval: Annotated[Text, typer.Option(help="Seconds between check rounds [default: 2].")] = None,
    timeout: Annotated[
        Text, typer.Option(help="Per-check time limit in seconds, below --interval [default: 1].")
    ] = None,
    rise: Annotated[Text, typer.Option(help="Passing rounds before announcing [default: 2].")] = None,
    fall: Annotated[Text, typer.Option(help="Failing rounds before withdrawing [default: 2].")] = None,
    ttl: Annotated[Text, typer.Option(help="Lease TTL in seconds, at least 3 [default: 30].")] = None,
    etcd_endpoints: Annotated[
        Text,
        typer.Option(help="Comma-separated etcd URLs [default: $ETCDCTL_ENDPOINTS, http://127.0.0.1:2379]."),
    ] = None,
    etcd_timeout: Annotated[
        Text, typer.Option(help="Per-request etcd deadline in seconds [default: min(2, TTL/6)].")
    ] = None,
    etcd_cacert: Annotated[
        Text, typer.Option(help="CA bundle for etcd TLS [default: $ETCDCTL_CACERT].")
    ] = None,
    etcd_cert: Annotated[Text, typer.Option(help="Client certificate [default: $ETCDCTL_CERT].")] = None,
    etcd_key: Annotated[Text, typer.Option(help="Client key [default: $ETCDCTL_KEY].")] = None,
    etcd_user: Annotated[
        Text, typer.Option(help="etcd user, or user:password [default: $ETCDCTL_USER].")
    ] = None,
    etcd_password_file: Annotated[
        Text, typer.Option(help="File holding the etcd password [default: $ETCDCTL_PASSWORD].")
    ] = None,
    shutdown_timeout: Annotated[
        Text, typer.Option(help="Bound on the withdraw at shutdown [default: 5].")
    ] = None,
    drain: Annotated[
        Text,
        typer.Option(
            help="Seconds to stay up after the withdraw at SIGTERM, while consumers converge [default: 0]."
        ),
    ] = None,
    maintenance_file: Annotated[
        Text,
        typer.Option(
            help="While this file exists the record is withdrawn; {service} {port} allowed [default: none]."
        ),
    ] = None,
    flap_limit: Annotated[
        Text, typer.Option(help="At most N announcements per window, as N/SECONDS, e.g. 3/60 [default: off].")
    ] = None,
    metrics_address: Annotated[
        Text, typer.Option(help="HOST:PORT for /metrics and /healthz [default: off].")
    ] = None,
    log_format: Annotated[Text, typer.Option(help="auto, json or console [default: auto].")] = None,
    log_level: Annotated[Text, typer.Option(help="debug, info, warning or error [default: info].")] = None,
    config: Annotated[Text, typer.Option(help="TOML file with any of these settings.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="check: print one JSON document.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> int:
    """Keep a service's record in etcd while its health checks pass."""
    del version
    flags: dict[str, Any] = {
        name: value for name, value in locals().items() if name not in ("mode", "json_output")
    }
    flags["checks"] = flags.pop("check")
    # Imported here so that --help and --version stay fast.
    from announcer.config import load_config
    from announcer.log import configure_logging
    from announcer.runner import run_agent, run_check_once

    env = dict(os.environ)
    cfg = load_config(flags, env)
    configure_logging(cfg.log_format, cfg.log_level)
    if mode is Mode.CHECK:
        return run_check_once(cfg, as_json=json_output)
    return run_agent(cfg, reload=lambda: load_config(flags, env))


def main() -> None:
    """Console entry point: one-line errors, exit 2 for bad input, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: unknown option, missing value
        sys.stderr.write(f"error: {exc.format_message()}\n")
        sys.exit(max(exc.exit_code, 2))
    except ConfigError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")  # one line, whatever it quotes
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
