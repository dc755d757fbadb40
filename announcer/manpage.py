"""announcer(1), generated from the CLI's own definition so the two cannot drift.

    python -m announcer.manpage > man/announcer.1

The page is shipped in the wheel (share/man/man1) and in the image; a test
checks that the committed page is what this module renders now.
"""

from __future__ import annotations

import sys
from typing import Any

from announcer import __version__
from announcer.cli import CHECK_HELP, LS_HELP, SUMMARY, command, subcommand

SECTIONS = {
    "SIGNALS": (
        "SIGTERM, SIGINT and SIGQUIT stop: the records are withdrawn at once, the agent stays up "
        "for --drain seconds, revokes its lease and exits 0; a second signal exits at once with "
        "128+N. SIGHUP re-reads the configuration and applies it without withdrawing. SIGUSR1 logs "
        "the agent's state. SIGUSR2, SIGALRM, SIGPIPE, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGXCPU, "
        "SIGXFSZ, SIGSTKFLT and the real-time signals are ignored. The signals of a real fault "
        "(SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP) keep their default: the "
        "process is broken and the lease TTL removes its records. A stop signal sent while "
        "announcer starts ends in exit 0 with nothing registered; announcer check keeps the "
        "default action."
    ),
    "EXIT STATUS": (
        "0: stopped by a signal, or (check) every check passed. 1: (check) a check failed. "
        "2: bad usage or configuration, one line on stderr, nothing touched in etcd. "
        "128+N: a second signal N during shutdown."
    ),
    "ENVIRONMENT": (
        "Every option is also ANNOUNCER_<NAME>, e.g. ANNOUNCER_SERVICE, ANNOUNCER_CHECK (specs "
        "separated by ';'), ANNOUNCER_META (KEY=VALUE pairs separated by ','). ETCDCTL_ENDPOINTS, "
        "ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, ETCDCTL_USER and ETCDCTL_PASSWORD are read as "
        "etcdctl reads them; COREOS_PUBLIC_IPV4 and COREOS_PRIVATE_IPV4 give the announced address. "
        "NOTIFY_SOCKET and WATCHDOG_USEC: systemd's readiness and watchdog protocol."
    ),
    "FILES": (
        "The TOML file named by --config holds any option (underscores for dashes), [[checks]] "
        "tables with per-check options, and, for one process serving a whole host, [[services]] "
        "tables, each one service with its own checks, on one lease."
    ),
}


def _escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line if line.startswith((".", "'")) else line) for line in text.splitlines())


def _options(params: list[Any]) -> list[str]:
    """Every option once, in the order of the table (the commands' own last)."""
    lines: list[str] = []
    seen: set[str] = set()
    for param in params:
        if param.param_type_name != "option" or param.name in seen:
            continue
        seen.add(param.name)
        names = ", ".join(f"\\fB{_escape(o)}\\fR" for o in [*param.opts, *param.secondary_opts])
        metavar = "" if param.is_flag else f" \\fI{_escape(param.metavar or 'VALUE')}\\fR"
        lines += [".TP", names + metavar, _escape(param.help or "")]
    return lines


def _shown_options(name: str) -> str:
    """The options a command's help shows (it takes the agent's others too, unshown)."""
    params = subcommand(name).params
    return ", ".join(o for p in params if p.param_type_name == "option" and not p.hidden for o in p.opts)


def render() -> str:
    root = command()
    lines = [
        f'.TH ANNOUNCER 1 "" "announcer {__version__}" "User Commands"',
        ".SH NAME",
        "announcer \\- " + _escape(SUMMARY.rstrip(".").lower()),
        ".SH SYNOPSIS",
        "\\fBannouncer\\fR [\\fIOPTIONS\\fR]",
        ".br",
        "\\fBannouncer check\\fR [\\fIOPTIONS\\fR]",
        ".br",
        "\\fBannouncer ls\\fR [\\fIOPTIONS\\fR] [\\fIPREFIX\\fR]",
        ".SH DESCRIPTION",
        _escape(" ".join((root.help or "").replace("`", "").split("\n\n")[1:])),
        ".SH COMMANDS",
        ".TP",
        "\\fBcheck\\fR",
        _escape(CHECK_HELP),
        ".TP",
        "\\fBls\\fR [\\fIPREFIX\\fR]",
        _escape(LS_HELP),
        ".SH OPTIONS",
        *_options([*root.params, *(p for n in ("check", "ls") for p in subcommand(n).params)]),
        ".SS Options of check",
        _escape(_shown_options("check")),
        ".SS Options of ls",
        _escape(_shown_options("ls")),
    ]
    for title, text in SECTIONS.items():
        lines += [f".SH {title}", _escape(text)]
    lines += [".SH SEE ALSO", "\\fBetcdctl\\fR(1), \\fBsystemd.service\\fR(5)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
