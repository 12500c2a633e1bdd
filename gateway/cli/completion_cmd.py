"""`scopegate completion bash|zsh|fish`: a completion script, generated from the parser itself.

Commands, actions, options and option choices (`-o table|wide|json|yaml`, `--state ...`) come
from walking argparse, so the script never lags behind the CLI. No dependency: the scripts are
static (no Python runs on TAB). zsh uses the bash script through bashcompinit.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any


def register(sub: Any) -> None:
    completion = sub.add_parser("completion", help="print a shell completion script (bash, zsh, fish)")
    completion.add_argument("shell", choices=("bash", "zsh", "fish"))
    completion.set_defaults(handler=print_completion)


@dataclass
class Node:
    help: str = ""
    options: list[tuple[list[str], str, list[str]]] = field(default_factory=list)  # flags, help, choices
    children: dict[str, Node] = field(default_factory=dict)


def tree(parser: argparse.ArgumentParser, help_text: str = "") -> Node:
    node = Node(help_text)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                node.children[name] = tree(child, helps.get(name, ""))
        elif action.option_strings:
            choices = [str(c) for c in action.choices] if action.choices else []
            node.options.append((list(action.option_strings), action.help or "", choices))
    return node


def _flags(node: Node) -> str:
    return " ".join(flag for flags, _, _ in node.options for flag in flags)


def bash(root: Node) -> str:
    lines = ["# scopegate bash completion: source <(scopegate completion bash)", "_scopegate() {",
             "    local cur prev words=() i command='' action=''",
             '    cur="${COMP_WORDS[COMP_CWORD]}"; prev="${COMP_WORDS[COMP_CWORD-1]}"',
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             '        case "${COMP_WORDS[i]}" in -*) continue ;; esac',
             '        if [[ -z $command ]]; then command="${COMP_WORDS[i]}"',
             '        elif [[ -z $action ]]; then action="${COMP_WORDS[i]}"; fi',
             "    done",
             '    case "$prev" in']
    choices: dict[str, list[str]] = {}
    for command in [root, *root.children.values(), *(a for c in root.children.values() for a in c.children.values())]:
        for flags, _, values in command.options:
            for flag in flags:
                known = choices.setdefault(flag, [])
                known += [v for v in values if v not in known]
    for flag, values in sorted((f, v) for f, v in choices.items() if v):
        words = shlex.quote(" ".join(values))
        lines.append(f'        {flag}) COMPREPLY=($(compgen -W {words} -- "$cur")); return ;;')
    lines += ["    esac", '    local candidates=""', '    case "$command" in']
    lines.append(f"        '') candidates={shlex.quote(' '.join(root.children) + ' ' + _flags(root))} ;;")
    for name, command in root.children.items():
        lines.append(f"        {shlex.quote(name)})")
        if command.children:
            lines.append('            case "$action" in')
            lines.append(f"                '') candidates={shlex.quote(' '.join(command.children))} ;;")
            for action_name, action in command.children.items():
                lines.append(f"                {shlex.quote(action_name)}) candidates={shlex.quote(_flags(action))} ;;")
            lines.append("            esac ;;")
        else:
            lines.append(f"            candidates={shlex.quote(_flags(command))} ;;")
    lines += ["    esac", '    COMPREPLY=($(compgen -W "$candidates" -- "$cur"))', "}",
              "complete -o default -F _scopegate scopegate", ""]
    return "\n".join(lines)


def zsh(root: Node) -> str:
    return ("#compdef scopegate\n# scopegate zsh completion (the bash script through bashcompinit)\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + bash(root))


def _fish_text(text: str) -> str:
    return shlex.quote(text.replace("\n", " "))


def fish(root: Node) -> str:
    names = " ".join(root.children)
    lines = ["# scopegate fish completion: scopegate completion fish > ~/.config/fish/completions/scopegate.fish",
             "complete -c scopegate -f"]
    for name, command in root.children.items():
        lines.append(f"complete -c scopegate -n 'not __fish_seen_subcommand_from {names}' -a {shlex.quote(name)} "
                     f"-d {_fish_text(command.help)}")
        scopes = [(f"__fish_seen_subcommand_from {name}", command)]
        if command.children:
            actions = " ".join(command.children)
            for action_name, action in command.children.items():
                lines.append(f"complete -c scopegate -n '__fish_seen_subcommand_from {name}; and not "
                             f"__fish_seen_subcommand_from {actions}' -a {shlex.quote(action_name)} "
                             f"-d {_fish_text(action.help)}")
            scopes = [(f"__fish_seen_subcommand_from {name}; and __fish_seen_subcommand_from {a}", node)
                      for a, node in command.children.items()]
        for condition, node in scopes:
            for flags, help_text, values in node.options:
                spec = " ".join(f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}" for f in flags)
                extra = f" -x -a {shlex.quote(' '.join(values))}" if values else ""
                lines.append(f"complete -c scopegate -n '{condition}' {spec}{extra} -d {_fish_text(help_text)}")
    return "\n".join(lines) + "\n"


def print_completion(args: argparse.Namespace) -> int:
    root = tree(args.root_parser)
    sys.stdout.write({"bash": bash, "zsh": zsh, "fish": fish}[args.shell](root))
    return 0
