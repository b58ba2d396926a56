"""The contributor CLI: one module per command, a light start-up, one error handling."""

from __future__ import annotations

import subprocess
import sys

from contributor.cli import COMMANDS, build_parser


def test_help_imports_no_heavy_library():
    """The command modules import torch, peft and grpc inside `run`, so parsing never does."""
    probe = ("import sys; from contributor.cli import build_parser; build_parser(); "
             "print(','.join(m for m in ('torch', 'peft', 'grpc', 'transformers') "
             "if m in sys.modules))")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True)
    assert shown.stdout.strip() == ""


def test_every_command_module_is_a_subcommand_that_runs_its_own_run():
    parser = build_parser()
    for command in COMMANDS:
        name = command.__name__.rsplit(".", 1)[1]
        argv = {"train": ["train", "--base", "b", "--data", "d", "--out", "o"],
                "gate": ["gate", "--adapter", "a", "--base", "b", "--data", "d", "--out", "o"],
                "inspect": ["inspect", "bundle"],
                "submit": ["submit", "bundle", "--coordinator", "h:1"],
                "cancel": ["cancel", "bundle", "--coordinator", "h:1"],
                "status": ["status", "--coordinator", "h:1"]}[name]
        args = parser.parse_args(argv)
        assert args.command == name and args.run is command.run


def test_a_gaggle_error_is_one_line_on_stderr_and_exit_2(cli, tmp_path):
    existing = tmp_path / "taken"
    existing.mkdir()
    code, out, err = cli("train", "--base", "tiny-llama", "--data", tmp_path / "none.jsonl",
                         "--out", existing)
    assert code == 2 and out == ""
    assert err == f"error: --out {existing} already exists: choose a new folder or remove " \
                  "the old one\n"
