"""The command line: parse, hand the flags to the config loader, hand over. No logic here.

The options are made from the table of settings (`announcer.settings.SETTINGS`):
each setting's flag, metavar, help and default are written there once. Values
stay text here on purpose: the same converters check a flag, an ``ANNOUNCER_*``
variable and a value in the file (one rule, one message, exit 2), so the CLI
declares each option's type for the help (its metavar) and leaves the checking to
`announcer.convert`.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import os
import sys
from typing import Any

import typer

from announcer import __version__, settings
from announcer.checks import KINDS
from announcer.errors import ConfigError

SUMMARY = "Keep a service's record in etcd while its health checks pass."
HELP = (
    f"{SUMMARY}\n\n"
    "`announcer [OPTIONS]` runs the agent until SIGTERM; "
    "`announcer check [OPTIONS]` runs the checks once and shows what would be registered "
    "(`announcer check --help`).\n\n"
    "Every option can also be set as ANNOUNCER_<NAME> (e.g. ANNOUNCER_SERVICE) or in the "
    "TOML file given with --config, which may also list many [[services]]; flags win over "
    "the environment, which wins over the file."
)
CHECK_HELP = (
    "Run every configured check once, print each result with the key and the record that would be "
    "registered, and exit 0 when all pass, 1 when one fails, 2 for a bad configuration. "
    "Touches no etcd. With --config naming a host file, checks every service."
)
COMMANDS = ("run", "check")


class Mode(enum.StrEnum):
    RUN = "run"
    CHECK = "check"


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"announcer {__version__}\n")
        raise typer.Exit


def _option(setting: settings.Setting) -> inspect.Parameter:
    """One setting as a typer option: text (or a list of texts, or a switch), converted later."""
    help_line = setting.help_line.replace("{kinds}", ", ".join(sorted(KINDS)))
    if setting.switch:
        kind: Any = bool
        info = typer.Option(False, setting.flag, help=help_line)
    else:
        kind = list[str] | None if setting.repeatable else str | None
        info = typer.Option(None, setting.flag, metavar=setting.metavar, help=help_line)
    return inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)


def _run(mode: Mode, given: dict[str, Any]) -> int:
    as_json = bool(given.pop("json", False))
    # Imported here so that --help and --version stay fast. announcer.config does not reach
    # structlog, so announcer.log is the one that first loads it, without rich (see there).
    from announcer.config import load_config
    from announcer.log import configure_logging
    from announcer.runner import run_agent, run_check_once

    env = dict(os.environ)
    cfg = load_config(given, env)
    configure_logging(cfg.log_format, cfg.log_level)
    if mode is Mode.CHECK:
        return run_check_once(cfg, as_json=as_json)
    return run_agent(cfg, reload=lambda: load_config(given, env))


def make_app() -> typer.Typer:
    """The typer app, its options made from the table as it is now."""
    app = typer.Typer(
        add_completion=False,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
        help=HELP,
    )

    def main_command(mode: Mode, version: bool, **given: Any) -> int:
        del version
        return _run(mode, given)

    mode = inspect.Parameter(
        "mode",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=typer.Argument(Mode.RUN, help="run (the default) or check once"),
        annotation=Mode,
    )
    version = inspect.Parameter(
        "version",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
        annotation=bool,
    )
    params = [mode, *(_option(s) for s in settings.SETTINGS), version]
    main_command.__signature__ = inspect.Signature(params, return_annotation=int)  # type: ignore[attr-defined]
    main_command.__annotations__ = {p.name: p.annotation for p in params} | {"return": int}
    app.command(help=HELP)(main_command)
    return app


app = make_app()


def command() -> Any:
    """The click command behind the CLI: the one definition help, man page and parsing share."""
    return typer.main.get_command(app)


def check_command() -> Any:
    """The same command as `check` sees it: its own description and only the options it uses."""
    root = command()
    used = {s.name for s in settings.SETTINGS if s.in_check} | {"version", "help"}
    params = [p for p in root.params if p.name in used and p.param_type_name == "option"]
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
    if not argv or argv[0].startswith("-") or argv[0] in COMMANDS:
        return None
    close = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.5)
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
