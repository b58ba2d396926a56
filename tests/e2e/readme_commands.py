"""README.md as commands, and running them as a user would: the parser and the runner behind
tests/e2e/test_readme.py.

`parse_readme` turns the README into commands: each line of a ```bash block, each inline code
span that starts with a program and has arguments, each ```python block whole. A
`Walkthrough` runs the command a marker names (bash for shell lines, a script of its own for
Python), after putting values in for its placeholders, in one scratch folder.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.servers import CommandProcess, launch_command

SHELL_LANGS = ("bash", "sh", "shell", "console")
PROGRAMS = ("gaggle-contributor", "gaggle-coordinator", "mlflow", "make", "python", "curl")

_FENCE = re.compile(r"^```(\S*)\s*$")
_SPAN = re.compile(r"`([^`]+)`")
_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*\s+")


@dataclass(frozen=True)
class ReadmeCommand:
    """One command of the README, as written there."""

    text: str  # one shell command, or a whole Python block
    kind: str  # "shell" or "python"
    line: int  # where it starts in README.md, from 1

    @property
    def key(self) -> str:
        """The shell command without its leading VAR=value assignments."""
        text = self.text
        while match := _ASSIGNMENT.match(text):
            text = text[match.end():]
        return text

    def matches(self, marker: str) -> bool:
        if self.kind == "python":
            return marker in self.text
        return self.key == marker or self.key.startswith(marker + " ")

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text.splitlines()[0]}"


def parse_readme(text: str) -> tuple[list[ReadmeCommand], list[tuple[int, str]]]:
    """(commands, other inline code spans with their lines); fenced blocks must say what
    they hold: bash (commands), python (code to run) or text (neither)."""
    lines = text.splitlines()
    commands: list[ReadmeCommand] = []
    prose = list(lines)  # the lines outside fenced blocks; fenced ones blanked
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        lang = fence.group(1)
        end = next((i for i in range(index + 1, len(lines)) if lines[i].startswith("```")),
                   None)
        if end is None:
            raise ValueError(f"README.md:{index + 1}: fenced block never closed")
        body = lines[index + 1:end]
        if lang in SHELL_LANGS:
            commands += _shell_lines(body, index + 2)
        elif lang == "python":
            commands.append(ReadmeCommand("\n".join(body), "python", index + 2))
        elif lang != "text":
            raise ValueError(f"README.md:{index + 1}: a fenced block tagged {lang or 'nothing'!r}"
                             "; tag it bash (commands), python (code to run) or text")
        prose[index:end + 1] = [""] * (end + 1 - index)
        index = end + 1
    spans = _inline_spans("\n".join(prose))
    commands += [ReadmeCommand(span, "shell", line) for line, span in spans if _is_command(span)]
    unique = {}
    for command in commands:
        unique.setdefault((command.kind, command.text), command)
    others = [(line, span) for line, span in spans if not _is_command(span)]
    return list(unique.values()), others


def _shell_lines(body: list[str], first_line: int) -> list[ReadmeCommand]:
    commands, pending, start = [], "", first_line
    for offset, raw in enumerate(body):
        line = re.sub(r"\s+#\s.*$", "", raw.strip()).removeprefix("$ ").strip()
        if not pending:
            start = first_line + offset
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        commands.append(ReadmeCommand(pending + line, "shell", start))
        pending = ""
    return commands


def _inline_spans(text: str) -> list[tuple[int, str]]:
    return [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in _SPAN.finditer(text)]


def _is_command(span: str) -> bool:
    """A program with arguments; a program's name alone (`gaggle-contributor`) is a name."""
    words = span.split()
    return len(words) > 1 and (words[0] in PROGRAMS or words[0].endswith(".py"))


def claim_of(command: ReadmeCommand, markers) -> str | None:
    """The longest of `markers` that the command matches, or None."""
    matching = [m for m in markers if command.matches(m)]
    return max(matching, key=len) if matching else None


@dataclass
class Pending:
    """A README command running in the background; `result()` waits and checks its exit."""

    shown: str  # what ran, for messages
    process: subprocess.Popen
    expect: int  # the exit code it must end with
    started: float
    timings: list[tuple[str, float]]

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        stdout, stderr = self.process.communicate(timeout=timeout)
        self.timings.append((self.shown, time.monotonic() - self.started))
        assert self.process.returncode == self.expect, (
            f"$ {self.shown}\nexit {self.process.returncode}, expected {self.expect}\n"
            f"stdout: {stdout[-2000:]}\nstderr: {stderr[-3000:]}")
        return subprocess.CompletedProcess(self.process.args, self.process.returncode,
                                           stdout, stderr)


@dataclass
class Walkthrough:
    """Runs README commands by marker in one scratch folder, values put in for placeholders."""

    commands: list[ReadmeCommand]
    run_here: dict[str, str]  # marker -> the fixture or test that runs its command
    markers: tuple[str, ...]  # every marker, here or elsewhere, to tell which claims a command
    workdir: Path  # every command's working folder: the README's relative paths land here
    env: dict[str, str]
    values: dict[str, str]  # placeholder (or literal) -> value, for every command
    ran: set[str] = field(default_factory=set)  # markers of commands run so far
    timings: list[tuple[str, float]] = field(default_factory=list)  # (command, wall seconds)

    def command(self, marker: str) -> ReadmeCommand:
        assert marker in self.run_here, f"{marker!r} is not a marker of a command run here"
        found = [c for c in self.commands if claim_of(c, self.markers) == marker]
        assert len(found) == 1, f"marker {marker!r} marks {len(found)} commands, not one"
        return found[0]

    def text(self, marker: str, values: dict[str, str] | None = None) -> str:
        """The README's text for `marker`, every placeholder replaced."""
        command = self.command(marker)
        text = command.text
        for placeholder, value in sorted({**self.values, **(values or {})}.items(),
                                         key=lambda item: -len(item[0])):
            text = re.sub(rf"(?<![\w-]){re.escape(placeholder)}(?![\w-])",
                          lambda _, v=value: v, text)
        if command.kind == "shell":
            # Upper-case words left over (not $VARS, not VAR=) are placeholders with no value.
            left = re.findall(r"(?<![\w$/-])[A-Z][A-Z0-9_]{2,}(?![\w=-])", text)
            assert not left, f"{command}: no value for placeholder(s) {left}"
        self.ran.add(marker)
        return text

    def spawn(self, marker: str, *extra: str, values: dict[str, str] | None = None,
              expect: int = 0, cwd: Path | None = None, prefix: str = "") -> Pending:
        """Start a README shell command (plus `extra` arguments) with bash, as a user would."""
        text = prefix + self.text(marker, values) + "".join(f" {shlex.quote(e)}" for e in extra)
        process = subprocess.Popen(["bash", "-c", text], cwd=cwd or self.workdir, env=self.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return Pending(text, process, expect, time.monotonic(), self.timings)

    def run(self, marker: str, *extra: str, timeout: float = 300,
            **options) -> subprocess.CompletedProcess:
        return self.spawn(marker, *extra, **options).result(timeout)

    def spawn_python(self, marker: str, values: dict[str, str] | None = None) -> Pending:
        """Start a README Python block as a script of its own."""
        script = self.workdir / f"readme_{self.command(marker).line}.py"
        script.write_text(self.text(marker, values), encoding="utf-8")
        process = subprocess.Popen([sys.executable, script.name], cwd=self.workdir,
                                   env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        return Pending(f"python {script} ({self.command(marker)})", process, 0,
                       time.monotonic(), self.timings)

    def launch(self, marker: str, values: dict[str, str] | None = None) -> CommandProcess:
        """Start a long-running README command (leading VAR=value go to its environment)."""
        words = shlex.split(self.text(marker, values))
        env = dict(self.env)
        while _ASSIGNMENT.match(words[0] + " "):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        log = self.workdir / "logs" / f"{marker.replace(' ', '-')}.log"
        return launch_command(words, log_path=log, cwd=self.workdir, env=env)

    def check_ran(self, owner: str) -> None:
        """Everything `run_here` says `owner` runs has run."""
        missing = [m for m, o in self.run_here.items() if o == owner and m not in self.ran]
        assert not missing, f"{owner} claims to run {missing} but did not"
