"""The command line: parse, hand the flags to the config loader, hand over. No logic here.

Values stay text here on purpose: the same converters check a flag, an
``ANNOUNCER_*`` variable and a value in the file (one rule, one message, exit 2),
so the CLI declares each option's type for the help (its metavar) and leaves the
checking to `announcer.convert`. Each default shown comes from the field it
belongs to in `announcer.settings`.
"""

from __future__ import annotations

import difflib
import enum
import os
import sys
from typing import Annotated, Any

import typer

from announcer import __version__
from announcer.checks import KINDS
from announcer.errors import ConfigError
from announcer.settings import DEFAULT_CHECK, DEFAULT_ENDPOINT, DEFAULT_KEY, Config, ServiceConfig, default

SUMMARY = "Keep a service's record in etcd while its health checks pass."
app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help=(
        f"{SUMMARY}\n\n"
        "`announcer [OPTIONS]` runs the agent until SIGTERM; "
        "`announcer check [OPTIONS]` runs the checks once and shows what would be registered "
        "(`announcer check --help`).\n\n"
        "Every option can also be set as ANNOUNCER_<NAME> (e.g. ANNOUNCER_SERVICE) or in the "
        "TOML file given with --config, which may also list many [[services]]; flags win over "
        "the environment, which wins over the file."
    ),
)
CHECK_HELP = (
    "Run every configured check once, print each result with the key and the record that would be "
    "registered, and exit 0 when all pass, 1 when one fails, 2 for a bad configuration. "
    "Touches no etcd. With --config naming a host file, checks every service."
)
# What `check` uses; the rest (etcd, lease, timing, lifecycle) only matter to the running agent.
CHECK_OPTIONS = frozenset({
    "service", "port", "ip", "hostname", "key", "meta", "check", "interval", "timeout", "config", "json_output",
    "log_format", "log_level", "version", "help",
})  # fmt: skip


class Mode(enum.StrEnum):
    RUN = "run"
    CHECK = "check"


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"announcer {__version__}\n")
        raise typer.Exit


def _d(cls: type, name: str) -> str:
    """A default as the help shows it, read from the settings field that holds it."""
    value = default(cls, name)
    return f"{value:g}" if isinstance(value, float) else str(value)


S, C = ServiceConfig, Config
Text = str | None
INT, SECONDS, TEXT = "INTEGER", "SECONDS", "TEXT"


@app.command(help=app.info.help)
def main_command(
    mode: Annotated[Mode, typer.Argument(help="run (the default) or check once")] = Mode.RUN,
    service: Annotated[Text, typer.Option(metavar="NAME", help="Service name, part of the key. [required]")] = None,
    port: Annotated[Text, typer.Option(metavar=INT, help="Announced port, 1-65535. [required]")] = None,
    ip: Annotated[Text, typer.Option(metavar="IPV4", help="Announced IPv4 [default: $COREOS_PUBLIC_IPV4, $COREOS_PRIVATE_IPV4, the default route's address].")] = None,
    hostname: Annotated[Text, typer.Option(metavar=TEXT, help="The record's host field [default: the host name].")] = None,
    key: Annotated[Text, typer.Option(metavar="TEMPLATE", help=f"Key template with {{service}} {{ip}} {{port}} {{hostname}} [default: {DEFAULT_KEY}].")] = None,
    meta: Annotated[list[str] | None, typer.Option(metavar="KEY=VALUE", help="Extra record field, repeatable.")] = None,
    check: Annotated[list[str] | None, typer.Option(metavar="SPEC", help=f"Health check, repeatable; all must pass. Kinds: {', '.join(sorted(KINDS))}. 'http', 'tcp', 'grpc' alone mean the announced ip:port; {{ip}} and {{port}} are filled in. [default: {DEFAULT_CHECK}]")] = None,
    interval: Annotated[Text, typer.Option(metavar=SECONDS, help=f"Seconds between check rounds. [default: {_d(S, 'interval')}]")] = None,
    timeout: Annotated[Text, typer.Option(metavar=SECONDS, help=f"Per-check time limit, below --interval. [default: {_d(S, 'timeout')}]")] = None,
    rise: Annotated[Text, typer.Option(metavar=INT, help=f"Passing rounds before announcing. [default: {_d(S, 'rise')}]")] = None,
    fall: Annotated[Text, typer.Option(metavar=INT, help=f"Failing rounds before withdrawing. [default: {_d(S, 'fall')}]")] = None,
    ttl: Annotated[Text, typer.Option(metavar=SECONDS, help=f"Lease TTL, at least 3. [default: {_d(C, 'ttl')}]")] = None,
    etcd_endpoints: Annotated[Text, typer.Option(metavar="URLS", help=f"Comma-separated etcd URLs [default: $ETCDCTL_ENDPOINTS, {DEFAULT_ENDPOINT}].")] = None,
    etcd_timeout: Annotated[Text, typer.Option(metavar=SECONDS, help="Deadline of one whole etcd request [default: min(2, TTL/6)].")] = None,
    etcd_cacert: Annotated[Text, typer.Option(metavar="FILE", help="CA bundle for etcd TLS [default: $ETCDCTL_CACERT].")] = None,
    etcd_cert: Annotated[Text, typer.Option(metavar="FILE", help="Client certificate [default: $ETCDCTL_CERT].")] = None,
    etcd_key: Annotated[Text, typer.Option(metavar="FILE", help="Client key [default: $ETCDCTL_KEY].")] = None,
    etcd_user: Annotated[Text, typer.Option(metavar="USER[:PASSWORD]", help="etcd user [default: $ETCDCTL_USER].")] = None,
    etcd_password_file: Annotated[Text, typer.Option(metavar="FILE", help="File holding the etcd password (else $ETCDCTL_PASSWORD).")] = None,
    shutdown_timeout: Annotated[Text, typer.Option(metavar=SECONDS, help=f"Bound on the etcd work at shutdown. [default: {_d(C, 'shutdown_timeout')}]")] = None,
    drain: Annotated[Text, typer.Option(metavar=SECONDS, help=f"Stay up this long after the withdraw at SIGTERM, while consumers converge. [default: {_d(S, 'drain')}]")] = None,
    maintenance_file: Annotated[Text, typer.Option(metavar="PATH", help="While this file exists the record is withdrawn; {service} {port} {ip} {hostname} allowed. [default: none]")] = None,
    flap_limit: Annotated[Text, typer.Option(metavar="N/SECONDS", help="At most N announcements per window, e.g. 3/60. [default: off]")] = None,
    metrics_address: Annotated[Text, typer.Option(metavar="HOST:PORT", help="Serve /metrics and /healthz. [default: off]")] = None,
    log_format: Annotated[Text, typer.Option(metavar="auto|json|console", help=f"JSON when stderr is not a terminal. [default: {_d(C, 'log_format')}]")] = None,
    log_level: Annotated[Text, typer.Option(metavar="debug|info|warning|error", help=f"[default: {_d(C, 'log_level')}]")] = None,
    config: Annotated[Text, typer.Option(metavar="FILE", help="TOML file with any of these settings, or many [[services]].")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="check: print one JSON document.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> int:  # fmt: skip
    del version
    flags: dict[str, Any] = {
        "service": service, "port": port, "ip": ip, "hostname": hostname, "key": key, "meta": meta,
        "checks": check, "interval": interval, "timeout": timeout, "rise": rise, "fall": fall, "ttl": ttl,
        "etcd_endpoints": etcd_endpoints, "etcd_timeout": etcd_timeout, "etcd_cacert": etcd_cacert,
        "etcd_cert": etcd_cert, "etcd_key": etcd_key, "etcd_user": etcd_user,
        "etcd_password_file": etcd_password_file, "shutdown_timeout": shutdown_timeout, "drain": drain,
        "maintenance_file": maintenance_file, "flap_limit": flap_limit, "metrics_address": metrics_address,
        "log_format": log_format, "log_level": log_level, "config": config,
    }  # fmt: skip
    # Imported here so that --help and --version stay fast. announcer.config does not reach
    # structlog, so announcer.log is the one that first loads it, without rich (see there).
    from announcer.config import load_config
    from announcer.log import configure_logging
    from announcer.runner import run_agent, run_check_once

    env = dict(os.environ)
    cfg = load_config(flags, env)
    configure_logging(cfg.log_format, cfg.log_level)
    if mode is Mode.CHECK:
        return run_check_once(cfg, as_json=json_output)
    return run_agent(cfg, reload=lambda: load_config(flags, env))


def command() -> Any:
    """The click command behind the CLI: the one definition help, man page and parsing share."""
    return typer.main.get_command(app)


def check_command() -> Any:
    """The same command as `check` sees it: its own description and only the options it uses."""
    root = command()
    params = [p for p in root.params if p.name in CHECK_OPTIONS and p.param_type_name == "option"]
    return type(root)(
        name="check",
        params=params,
        help=CHECK_HELP,
        context_settings=root.context_settings,
        rich_markup_mode=None,
    )


def help_text(cmd: Any, name: str) -> str:
    return str(cmd.get_help(cmd.make_context(name, [], resilient_parsing=True)))


def _check_help(argv: list[str]) -> bool:
    """`announcer check --help`: the check command's own help."""
    if argv[:1] != ["check"] or not {"-h", "--help"} & set(argv[1:]):
        return False
    sys.stdout.write(help_text(check_command(), "announcer check") + "\n")
    return True


def _unknown_command(argv: list[str]) -> str | None:
    """A first word that looks like a mistyped command, and what it probably meant."""
    if not argv or argv[0].startswith("-") or argv[0] in ("run", "check"):
        return None
    close = difflib.get_close_matches(argv[0], ["run", "check"], n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; the commands are 'run' (the default) and 'check'"
    return f"no command {argv[0]!r}{hint}"


def main() -> None:
    """Console entry point: one-line errors, exit 2 for bad input, never a traceback."""
    argv = sys.argv[1:]
    if _check_help(argv):
        sys.exit(0)
    typo = _unknown_command(argv)
    if typo is not None:
        sys.stderr.write(f"error: {typo}\n")
        sys.exit(2)
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
