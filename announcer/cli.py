"""The command line: parse, hand the flags to the config loader, hand over. No logic here.

The options are made from the table of settings (`announcer.settings.SETTINGS`):
each setting's flag, metavar, help and default are written there once, with the
commands that take it. Values stay text here on purpose: the same converters check
a flag, an ``ANNOUNCER_*`` variable and a value in the file (one rule, one message,
exit 2), so the CLI declares each option's type for the help (its metavar) and
leaves the checking to `announcer.convert`.

`announcer [OPTIONS]` (the systemd form) runs the agent; `run`, `check` and `ls` are
commands, each with the options it uses. Options given before a command count too.
"""

from __future__ import annotations

import difflib
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
    "`announcer [OPTIONS]` runs the agent until SIGTERM (`announcer run` is the same); "
    "`announcer check [OPTIONS]` runs the checks once and shows what would be registered; "
    "`announcer ls [PREFIX]` lists what is registered.\n\n"
    "Every option can also be set as ANNOUNCER_<NAME> (e.g. ANNOUNCER_SERVICE) or in the "
    "TOML file given with --config, which may also list many [[services]]; flags win over "
    "the environment, which wins over the file."
)
RUN_HELP = "Run the agent until SIGTERM: the same as giving no command."
CHECK_HELP = (
    "Run every configured check once, print each result with every key and value that would be "
    "registered, and exit 0 when all pass, 1 when one fails, 2 for a bad configuration. "
    "Touches no etcd. With --config naming a host file, checks every service."
)
LS_HELP = (
    "List what is registered under PREFIX (by default the configured key's prefix and every "
    "configured format's root): key, service, address, the lease's time left and the host "
    "that wrote it; values decoded, another writer's bytes shown escaped. --json for scripts, "
    "--watch to follow every change. Uses the agent's etcd settings; exit 1 when etcd cannot "
    "be read."
)
COMMANDS = (settings.RUN, settings.CHECK, settings.LS)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"announcer {__version__}\n")
        raise typer.Exit


def _option(setting: settings.Setting, *, hidden: bool = False) -> inspect.Parameter:
    """One setting as a typer option: text (or a list of texts, or a switch), converted later."""
    help_line = setting.help_line.replace("{kinds}", ", ".join(sorted(KINDS)))
    if setting.switch:
        kind: Any = bool
        info = typer.Option(False, setting.flag, help=help_line, hidden=hidden)
    else:
        kind = list[str] | None if setting.repeatable else str | None
        info = typer.Option(None, setting.flag, metavar=setting.metavar, help=help_line, hidden=hidden)
    return inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)


def _params(command: str, *extra: inspect.Parameter) -> list[inspect.Parameter]:
    """A command's parameters: the context, its arguments, its settings' options, --version."""
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    version = inspect.Parameter(
        "version",
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
        annotation=bool,
    )
    # Every command takes the agent's options, so that a unit's command line can be checked or
    # listed as it is; the help of each shows only those it uses.
    options = [
        _option(s, hidden=command not in s.commands)
        for s in settings.SETTINGS
        if command in s.commands or settings.RUN in s.commands
    ]
    return [context, *extra, *options, version]


def _typed(function: Any, params: list[inspect.Parameter]) -> Any:
    """``function`` with the signature typer reads its options from."""
    function.__signature__ = inspect.Signature(params, return_annotation=int)
    function.__annotations__ = {p.name: p.annotation for p in params} | {"return": int}
    return function


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None and v != [] and v is not False}


def _run(command: str, given: dict[str, Any]) -> int:
    as_json = bool(given.pop("json", False))
    watch = bool(given.pop("watch", False))
    prefix = given.pop("prefix", None)
    # Imported here so that --help and --version stay fast. announcer.config does not reach
    # structlog, so announcer.log is the one that first loads it, without rich (see there).
    from announcer.config import load_config, load_listing
    from announcer.log import configure_logging

    env = dict(os.environ)
    if command == settings.LS:
        from announcer.listing import run_ls

        listing = load_listing(given, env, prefix)
        configure_logging(listing.log_format, listing.log_level)
        return run_ls(listing, as_json=as_json, watch=watch)
    from announcer.runner import run_agent, run_check_once

    cfg = load_config(given, env)
    configure_logging(cfg.log_format, cfg.log_level)
    if command == settings.CHECK:
        return run_check_once(cfg, as_json=as_json)
    return run_agent(cfg, reload=lambda: load_config(given, env))


def make_app() -> typer.Typer:
    """The typer app, its commands' options made from the table as it is now."""
    app = typer.Typer(
        add_completion=False,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
        help=HELP,
    )

    def root(ctx: typer.Context, version: bool, **given: Any) -> int:
        del version
        ctx.obj = _given(given)
        if ctx.invoked_subcommand is None:  # `announcer [OPTIONS]`: the systemd form runs the agent
            return _run(settings.RUN, dict(ctx.obj))
        return 0

    def command_of(name: str) -> Any:
        def invoke(ctx: typer.Context, version: bool, **given: Any) -> int:
            del version
            before = dict(ctx.obj or {})  # options given before the command name
            return _run(name, before | _given(given))

        invoke.__name__ = name
        return invoke

    prefix = inspect.Parameter(
        "prefix",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=typer.Argument(None, metavar="[PREFIX]", help="List under this key prefix only."),
        annotation=str | None,
    )
    app.callback(invoke_without_command=True)(_typed(root, _params(settings.RUN)))
    app.command(settings.RUN, help=RUN_HELP)(_typed(command_of(settings.RUN), _params(settings.RUN)))
    app.command(settings.CHECK, help=CHECK_HELP)(_typed(command_of(settings.CHECK), _params(settings.CHECK)))
    app.command(settings.LS, help=LS_HELP)(_typed(command_of(settings.LS), _params(settings.LS, prefix)))
    return app


app = make_app()


def command() -> Any:
    """The click group behind the CLI: the one definition help, man page and parsing share."""
    return typer.main.get_command(app)


def subcommand(name: str) -> Any:
    """One command (`run`, `check`, `ls`) with its own description and options."""
    return command().commands[name]


def check_command() -> Any:
    return subcommand(settings.CHECK)


def help_text(cmd: Any, name: str) -> str:
    return str(cmd.get_help(cmd.make_context(name, [], resilient_parsing=True)))


def _unknown_command(argv: list[str]) -> str | None:
    """A first word that looks like a mistyped command, and what it probably meant."""
    if not argv or argv[0].startswith("-") or argv[0] in COMMANDS:
        return None
    close = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.5)
    hint = (
        f"; did you mean '{close[0]}'?"
        if close
        else "; the commands are 'run' (the default), 'check' and 'ls'"
    )
    return f"no command {argv[0]!r}{hint}"


def main() -> None:
    """Console entry point: one-line errors, exit 2 for bad input, never a traceback."""
    typo = _unknown_command(sys.argv[1:])
    if typo is not None:
        sys.stderr.write(f"error: {typo}\n")
        sys.exit(2)
    try:
        code = app(standalone_mode=False, prog_name="announcer")
    except typer.TyperException as exc:  # usage errors: unknown option, missing value
        sys.stderr.write(f"error: {exc.format_message()}\n")
        sys.exit(max(exc.exit_code, 2))
    except ConfigError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")  # one line, whatever it quotes
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
