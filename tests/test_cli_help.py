"""`scopegate ... --help` and `scopegate completion bash|zsh|fish` (issue 16 item 14).

Every command's help has a description and an example (the parser is walked, so a new command
without one fails here); the bash script parses (`bash -n`) and completes commands, actions,
options and option choices; zsh and fish scripts name every command (and are checked by the
shells themselves where installed).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.cli.helptext import subcommands
from gateway.cli.main import build_parser
from tests.test_cli_ops import base_env, run

Result = subprocess.CompletedProcess[str]


def ok(result: Result) -> Result:
    assert result.returncode == 0, (result.args, result.stderr)
    return result


def test_every_command_help_has_a_description_and_an_example() -> None:
    parser = build_parser()
    seen = []
    for path, command in subcommands(parser):
        text = command.format_help()
        seen.append(path)
        assert "Example" in text, f"`scopegate {path} --help` has no example"
        assert command.description, f"`scopegate {path}` has no description"
    assert {"", "token list", "token attenuate", "whoami", "completion", "store info", "keys retire"} <= set(seen)


def test_help_through_the_real_entry_point() -> None:
    result = run(["token", "list", "--help"], base_env(), Path.cwd())
    assert ok(result).stdout.count("scopegate token list") >= 2  # usage line and examples


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    return {path.split()[0] for path, _ in subcommands(parser) if path}


def test_bash_completion_parses_and_completes_commands_actions_and_options(tmp_path: Path) -> None:
    script = tmp_path / "scopegate.bash"
    script.write_text(ok(run(["completion", "bash"], base_env(), tmp_path)).stdout)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    probe = (f"source {script}\n"
             "t() { COMP_WORDS=(\"$@\"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); _scopegate; "
             "echo \"${COMPREPLY[*]}\"; }\n"
             "t scopegate ''\nt scopegate token ''\nt scopegate token list --st\nt scopegate token list -o ''\n")
    lines = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert set(lines[0].split()) >= _commands(build_parser())
    assert set(lines[1].split()) == {"mint", "list", "show", "revoke", "rotate", "attenuate"}
    assert lines[2].split() == ["--state"]
    assert set(lines[3].split()) >= {"table", "wide", "json", "yaml"}


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_completion_scripts_name_every_command(shell: str, tmp_path: Path) -> None:
    text = ok(run(["completion", shell], base_env(), tmp_path)).stdout
    for command in _commands(build_parser()):
        assert command in text
    binary = shutil.which(shell)
    if binary is not None:  # not installed on every machine; checked where it is
        check = [binary, "-n", "-c", text] if shell == "zsh" else [binary, "--no-execute", "-c", text]
        assert subprocess.run(check, capture_output=True, check=False).returncode == 0
    refused = run(["completion", "tcsh"], base_env(), tmp_path)
    assert refused.returncode == 2
