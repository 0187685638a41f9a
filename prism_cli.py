"""The ``prism`` command line: one Typer app, one sub-command group per part of the platform."""

from __future__ import annotations

import typer

from common.progress import level_of, setup_logging

app = typer.Typer(
    name="prism",
    help="Multi-resolution pixel diffusion: data, science, training, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _verbosity(quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors "
                                          "only: no status lines, no progress bars (results "
                                          "still go to stdout)"),
               verbose: bool = typer.Option(False, "--verbose", "-v", help="also debug "
                                            "messages")) -> None:
    """Multi-resolution pixel diffusion: data, science, training, serving."""
    if quiet and verbose:
        raise typer.BadParameter("give --quiet or --verbose, not both")
    setup_logging(level_of(quiet, verbose))


# Each part registers its own commands here (one line each).
# -- registrations --
from pipelines.cli.data import data_app; app.add_typer(data_app, name="data")  # noqa: E402, E702, I001
from training.cli import train_command; app.command("train")(train_command)  # noqa: E402, E702, I001
from serving.cli import serving_app; app.add_typer(serving_app)  # noqa: E402, E702, I001
from pipelines.cli.science import science_app; app.add_typer(science_app, name="science")  # noqa: E402, E702, I001, E501
from pipelines.cli.evaluate import eval_app; app.add_typer(eval_app, name="eval")  # noqa: E402, E702, I001
from pipelines.cli.pipeline import pipeline_app; app.add_typer(pipeline_app, name="pipeline")  # noqa: E402, E702, I001, E501
from pipelines.cli.experiment import experiment_app; app.add_typer(experiment_app, name="experiment")  # noqa: E402, E702, I001, E501


def main() -> None:
    app()


if __name__ == "__main__":
    main()
