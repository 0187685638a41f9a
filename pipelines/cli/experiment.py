"""``prism experiment``: reproduce a seed paper's claim with one command.

    prism experiment list
    prism experiment show NAME [--setting small|gpu]
    prism experiment run NAME [--setting small|gpu] [--set key=value ...] [--out DIR]
    prism experiment log DIR          (log a results folder made without MLflow)
    prism experiment table DIR        (its tables in markdown, for a results page)
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from common.cli_help import examples
from common.run_config import ConfigError, parse_overrides

experiment_app = typer.Typer(help="Reproduce the seed papers' claims: train or reuse reference "
                                  "models, sample at fixed seeds, measure, write results.",
                             no_args_is_help=True)


def _overrides(pairs: list[str]) -> dict:
    try:
        return parse_overrides(pairs)
    except ConfigError as err:
        raise typer.BadParameter(str(err), param_hint="--set") from None


@experiment_app.command("list", epilog=examples("prism experiment list"))
def list_command() -> None:
    """The experiments, their settings and the claim each one tests."""
    # deferred: the experiments import torch (~1.5 s): a command loads them, --help does not
    from pipelines.experiments import EXPERIMENTS

    for exp in EXPERIMENTS.values():
        typer.echo(f"{exp.name}  [{', '.join(exp.presets)}]\n    {exp.claim}")


@experiment_app.command("show", epilog=examples(
    "prism experiment show chromatogram",
    "prism experiment show upsample-guidance --setting gpu --set n_images=500"))
def show_command(name: str = typer.Argument(..., help="experiment name"),
                 setting: str = typer.Option("small", "--setting", help="small or gpu "
                                             "(prism experiment list)"),
                 set_: list[str] = typer.Option([], "--set", help="override key=value")) -> None:
    """The resolved settings of NAME (JSON)."""
    from pipelines.experiments import ExperimentError, resolve

    try:
        s = resolve(name, setting, _overrides(set_))
    except ExperimentError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(s.model_dump(mode="json"), indent=1))


@experiment_app.command("run", epilog=examples(
    "prism experiment run chromatogram --setting small --out results/chromatogram",
    "prism experiment run dimr-vs-dit --setting gpu --set device=cuda"))
def run_command(name: str = typer.Argument(..., help="experiment name (prism experiment list)"),
                setting: str = typer.Option("small", "--setting",
                                            help="small (CPU, a minute) or gpu"),
                set_: list[str] = typer.Option([], "--set", help="override, e.g. --set "
                                               "n_images=2000 --set device=cuda"),
                out: Path = typer.Option(None, "--out", help="results folder (default "
                                         "<work_dir>/<name>/<setting>)")) -> None:
    """Run NAME: references trained or reused, samples, metrics, results.json and figures."""
    from pipelines.experiments import ExperimentError, run

    try:
        results = run(name, setting, _overrides(set_), str(out) if out else None)
    except ExperimentError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    v = results.get("verdict", {})
    typer.echo(json.dumps({"experiment": name, "setting": setting, "verdict": v.get("verdict"),
                           "mlflow_run_id": results.get("mlflow_run_id")}, indent=1))


@experiment_app.command("log", epilog=examples(
    "prism experiment log results/chromatogram"))
def log_command(out: Path = typer.Argument(..., help="a results folder with results.json")) -> None:
    """Log a results folder to MLflow (for runs made where MLflow was not installed)."""
    from pipelines.experiments import log_results

    if not (out / "results.json").exists():
        typer.echo(f"error: no results.json in {out}", err=True)
        raise typer.Exit(2)
    typer.echo(f"logged: run {log_results(str(out))}")


@experiment_app.command("table", epilog=examples(
    "prism experiment table results/chromatogram",
    "prism experiment table outputs/experiments/dimr-vs-dit/gpu/results.json"))
def table_command(src: Path = typer.Argument(..., help="a results folder or its results.json")
                  ) -> None:
    """The results as markdown tables: rows with their floors, paired differences, verdict."""
    from pipelines.experiments.tables import results_markdown

    path = src / "results.json" if src.is_dir() else src
    if not path.is_file():
        typer.echo(f"error: no results.json at {src}", err=True)
        raise typer.Exit(2)
    typer.echo(results_markdown(json.loads(path.read_text())), nl=False)
