"""``prism pipeline ...``: the glue commands of the DVC pipeline (dvc.yaml).

``prism pipeline promote`` is the register stage (pipelines/evaluation/register.py);
``prism pipeline records KIND SRC DEST`` turns a stage's JSON into what ``dvc metrics`` /
``dvc plots`` read (pipelines/records.py).
"""

from __future__ import annotations

import json

import typer

from common.cli_help import examples
from pipelines.records import write_records

pipeline_app = typer.Typer(help="DVC pipeline glue: promote the best model, metrics/plot files.",
                           no_args_is_help=True)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2) from None


@pipeline_app.command("promote", epilog=examples(
    "prism pipeline promote --params params.yaml --eval-dir outputs/eval"))
def promote_cmd(params: str = typer.Option("params.yaml", help="params.yaml with models: and "
                                                               "register:"),
                eval_dir: str = typer.Option("outputs/eval", help="evaluate outputs, one "
                                                                  "folder per model"),
                train_dir: str = typer.Option("outputs/train", help="training outputs, one "
                                                                    "folder per model"),
                out: str = typer.Option("outputs/register.json", help="decision record")) -> None:
    """Pick the best evaluated model and set its MLflow alias (champion) if it passes."""
    # deferred: the register stage imports torch (~1.5 s): the command loads it, --help does not
    from pipelines.evaluation.register import promote

    try:
        result = promote(params, eval_dir, train_dir, out)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(json.dumps({k: result[k] for k in ("best", "value", "passed", "promoted")}))


@pipeline_app.command("records", epilog=examples(
    "prism pipeline records loss outputs/train/demo-v/metrics.jsonl outputs/metrics/loss.json",
    "prism pipeline records register outputs/register.json outputs/metrics/register.json"))
def records_cmd(kind: str = typer.Argument(..., help="loss, rapsd, chromatogram, schedules, "
                                                     "eval, eval-steps or register"),
                src: str = typer.Argument(..., help="the stage's JSON / JSONL"),
                dest: str = typer.Argument(..., help="JSON for dvc metrics / dvc plots (eval: "
                                                     "a directory, one file per row)")) -> None:
    """Convert a stage output into a DVC metrics mapping or a DVC plots record list."""
    try:
        n = write_records(kind, src, dest)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"wrote {dest} ({n} {kind} entries)")
