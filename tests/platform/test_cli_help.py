"""Every ``prism`` command documents every option: a description, the valid values of closed
sets, and examples that name things that exist."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

import prism_cli
from components.samplers import SAMPLERS

ROOT = Path(__file__).resolve().parents[2]


def _options(command, path: tuple[str, ...] = ("prism",)):
    """(command path, option) for every option of every leaf command."""
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _options(sub, (*path, name))
        return
    for p in command.params:
        if getattr(p, "param_type_name", "") == "option" and p.name != "help":
            yield " ".join(path), p


def test_every_option_is_described():
    opts = list(_options(typer.main.get_command(prism_cli.app)))
    assert len(opts) > 80  # the walk reached the sub-commands
    bare = [f"{cmd} {p.opts[0]}" for cmd, p in opts if not (p.help or "").strip()]
    assert not bare, f"options without a description: {bare}"


def test_sampler_options_list_the_valid_samplers():
    samplers = [(cmd, p) for cmd, p in _options(typer.main.get_command(prism_cli.app))
                if p.name == "sampler"]
    assert samplers
    for cmd, p in samplers:
        for name in SAMPLERS:
            assert name in p.help, f"{cmd} --sampler does not list {name}"


def test_train_section_example_exists_in_params():
    (p,) = [p for cmd, p in _options(typer.main.get_command(prism_cli.app))
            if cmd == "prism train" and p.name == "section"]
    example = p.help.split("e.g. ")[1].split()[0]
    node = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in example.split("."):
        assert key in node, f"--section example {example} is not in params.yaml"
        node = node[key]


def test_the_command_line_loads_without_torch_or_ray():
    """`prism --help` stays fast (about 0.3 s): the command modules defer torch, Ray and MLflow
    to the command that needs them."""
    import subprocess
    import sys

    code = ("import sys, prism_cli; heavy = {'torch', 'ray', 'mlflow'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
