"""The README's examples run as written: its Python blocks execute, its command lines name real options."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest

from sae_guard.cli import build_parser
from sae_guard.concepts import PoorConceptWarning

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.M | re.S)


def _cli_lines() -> list[list[str]]:
    """Every `sae-guard ...` line of the bash blocks, as words, comments and [optional] parts dropped."""
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).strip()
            if line.startswith("sae-guard"):
                lines.append(shlex.split(line)[1:])
    return lines


def test_readme_has_examples():
    assert _blocks("python") and _cli_lines()


@pytest.mark.parametrize("words", _cli_lines(), ids=lambda words: " ".join(words[:2]))
def test_readme_command_lines_name_real_subcommands_and_options(words):
    """Each line's subcommand exists and every --option on it is one the subcommand accepts."""
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert words[0] in subparsers, f"README names an unknown subcommand: sae-guard {words[0]}"
    accepted = {option for action in subparsers[words[0]]._actions for option in action.option_strings}
    unknown = [w for w in words[1:] if w.startswith("--") and w not in accepted]
    assert not unknown, f"README's `sae-guard {words[0]}` line uses options it does not have: {unknown}"


def test_readme_help_line_runs(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0 and "classify" in capsys.readouterr().out


@pytest.mark.slow  # loads the real pretrained MiniLM encoder and the shipped minilm-prompts recipe
@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, recwarn):
    from sae_guard.prompts import prompts_dir

    try:
        prompts_dir()
    except FileNotFoundError as error:
        pytest.skip(f"the README example reads the public prompt data: {error}")
    monkeypatch.chdir(tmp_path)  # it saves "my_sae" into the working directory
    namespace: dict = {"__name__": "__readme__"}
    warnings.simplefilter("error", PoorConceptWarning)  # the example's concept must be a working one
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), namespace)
    assert (tmp_path / "my_sae" / "cfg.json").is_file()
    if "figures" in namespace:  # the example's SAE learned something on its small budget
        assert namespace["figures"]["fvu"] < 0.8
