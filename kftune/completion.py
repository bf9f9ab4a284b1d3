"""`kftune completion bash`: a bash (and zsh, through bashcompinit) completion script made from the parser.

The script holds, for every command path ("kftune", "kftune models", "kftune models list", ...), the words
that may follow it (subcommands, the values of a positional with fixed choices, options), and for each option
with fixed choices those choices. An option
that takes a free value (a file, a model name) falls back to the shell's file completion.
"""

from __future__ import annotations

import argparse
import shlex

TEMPLATE = """# kftune completion: eval "$(kftune completion bash)"  (zsh: autoload -U +X bashcompinit && bashcompinit first)
declare -gA _kftune_words=(
{words}
)
declare -gA _kftune_choices=(
{choices}
)
_kftune() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} path=kftune w i
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        [[ -n ${{_kftune_words["$path $w"]+x}} ]] && path="$path $w"
    done
    if [[ -n ${{_kftune_choices["$path $prev"]+x}} ]]; then
        COMPREPLY=($(compgen -W "${{_kftune_choices["$path $prev"]}}" -- "$cur"))
    elif [[ -n ${{_kftune_choices["$path $prev="]+x}} ]]; then
        COMPREPLY=()  # an option that takes a free value: the shell completes file names
    else
        COMPREPLY=($(compgen -W "${{_kftune_words[$path]}}" -- "$cur"))
    fi
}}
complete -o default -F _kftune kftune
"""


def _walk(parser: argparse.ArgumentParser, path: str, words: dict, choices: dict) -> None:
    subcommands, values, options, mine = [], [], [], {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                subcommands.append(name)
                _walk(child, f"{path} {name}", words, choices)
        elif action.option_strings and action.help != argparse.SUPPRESS:
            options += action.option_strings
            if action.choices:
                for opt in action.option_strings:
                    mine[f" {opt}"] = " ".join(map(str, action.choices))
            elif action.nargs != 0:  # takes a free value: marked so the script leaves it to file completion
                for opt in action.option_strings:
                    mine[f" {opt}="] = ""
        elif action.choices and not values:  # the first positional with fixed values (schedule list, step ingest)
            values = list(map(str, action.choices))
    words[path] = " ".join(dict.fromkeys(subcommands + values + options))
    # after such a value the same options follow: it is a path of its own (kftune schedule list --host ...)
    for at in [path, *(f"{path} {v}" for v in values)]:
        if at != path:
            words[at] = " ".join(dict.fromkeys(options))
        choices.update({at + k: v for k, v in mine.items()})


def bash_script(parser: argparse.ArgumentParser) -> str:
    words, choices = {}, {}
    _walk(parser, "kftune", words, choices)
    entry = lambda k, v: f"    [{shlex.quote(k)}]={shlex.quote(v)}"  # noqa: E731
    return TEMPLATE.format(words="\n".join(entry(k, v) for k, v in words.items()),
                           choices="\n".join(entry(k, v) for k, v in choices.items()))
