"""``prism data ...``: demo corpus, ingest, spectral statistics, schedule model.

Each command reads its section of ``params.yaml`` (``--params``, section ``data.<command>``)
and lets the options given on the command line override single fields. Status lines go to
the log (stderr; ``prism --quiet`` silences them); a command's result goes to stdout.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from common.cli_help import examples
from common.storage import StorageError
from pipelines.config import load_section

data_app = typer.Typer(help="Data: demo corpus, ingest to shards, spectra, schedule model.",
                       no_args_is_help=True)
PARAMS = typer.Option(None, "--params", help="params.yaml to read data.<command> from")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2) from None


@data_app.command("demo", epilog=examples(
    "prism data demo demo-images --per-class 8",
    "prism data demo demo-images --params params.yaml --size 64"))
def demo(dest: str = typer.Argument(..., help="output folder"),
         params: Optional[str] = PARAMS,
         size: Optional[int] = typer.Option(None, help="image side (default 32)"),
         per_class: Optional[int] = typer.Option(None, help="images per class (default 64)"),
         seed: Optional[int] = typer.Option(None, help="crop seed (default 0)")) -> None:
    """Build the embedded demo corpus (crops of scikit-image's photographs; no download)."""
    # deferred: the stages import numpy, torch, pyarrow (~1.5 s): each command loads its own,
    # so that --help stays fast
    from pipelines.data.demo import build_demo

    try:
        cfg = load_section(params, "demo", {"size": size, "per_class": per_class, "seed": seed})
        build_demo(dest, cfg, log=typer.echo)  # its summary line is the result
    except (ValueError, OSError) as exc:
        _fail(exc)


@data_app.command("ingest", epilog=examples(
    "prism data ingest photos shards --size 32 --shard-size 1000 --gzip",
    "prism data ingest s3://my-bucket/raw-tars s3://my-bucket/shards --size 64",
    "prism data ingest photos shards --params params.yaml --fresh"))
def ingest(src: str = typer.Argument(..., help="folder, .tar[.gz], .npz, or shards (local/s3)"),
           dest: str = typer.Argument(..., help="output folder or s3://bucket/prefix"),
           params: Optional[str] = PARAMS,
           name: Optional[str] = typer.Option(None, help="shard prefix (default shard)"),
           size: Optional[int] = typer.Option(None, help="target side, centre crop + resize "
                                              "(default: each image keeps its size)"),
           shard_size: Optional[int] = typer.Option(None, help="samples per shard "
                                                    "(default 10000)"),
           shard_bytes: Optional[int] = typer.Option(None, help="bytes per shard (instead)"),
           gzip: Optional[bool] = typer.Option(None, "--gzip/--no-gzip", help="gzip each shard "
                                               "(.tar.gz; default: no)"),
           seed: Optional[int] = typer.Option(None, help="shuffle seed (default 0)"),
           small: Optional[str] = typer.Option(
               None, help="images smaller than --size: reject (default), upscale or pad"),
           fresh: bool = typer.Option(False, "--fresh", help="delete shards of an earlier run "
                                      "into OUT first (a re-run with other inputs or settings "
                                      "refuses without it)")) -> None:
    """Images -> WebDataset shards, manifest.parquet, errors.parquet (inputs = written + errors).

    A re-run into the same OUT resumes when the inputs and settings are the same, and refuses,
    naming what changed, when they are not (--fresh starts over)."""
    from pipelines.data.ingest import ingest as run

    over = {"name": name, "size": size, "shard_size": shard_size, "shard_bytes": shard_bytes,
            "gzip": gzip, "seed": seed, "small": small}
    try:
        cfg = load_section(params, "ingest", over)
        if shard_bytes is not None:
            cfg = cfg.model_copy(update={"shard_size": None})
        result = run(src, dest, cfg, fresh=fresh)
    except (ValueError, OSError, StorageError) as exc:
        _fail(exc)
    typer.echo(result.line())


@data_app.command("spectra", epilog=examples(
    "prism data spectra shards stats",
    "prism data spectra s3://my-bucket/shards s3://my-bucket/stats --eps-lo 0.01 --eps-hi 10"))
def spectra(shards: str = typer.Argument(..., help="folder or s3:// prefix of shards"),
            out: str = typer.Argument(..., help="output folder or s3:// prefix"),
            params: Optional[str] = PARAMS,
            workers: Optional[int] = typer.Option(None, help="tasks in flight"),
            shards_per_task: Optional[int] = typer.Option(
                None, help="shards per Ray task (default 1)"),
            eps_lo: Optional[float] = typer.Option(
                None, help="SNR of the image's strongest spectral component at lambda_min "
                "(default 0.01)"),
            eps_hi: Optional[float] = typer.Option(
                None, help="SNR of its weakest component at lambda_max (default 10)"),
            fresh: bool = typer.Option(False, "--fresh", help="recompute outputs made with "
                                       "other settings or from changed shards (a re-run "
                                       "refuses without it)")) -> None:
    """Per-image spectra, fits and schedule bounds on Ray (RAY_ADDRESS or a local cluster)."""
    from pipelines.data.spectra_job import run_spectra

    over = {"workers": workers, "shards_per_task": shards_per_task, "eps_lo": eps_lo,
            "eps_hi": eps_hi}
    try:
        result = run_spectra(shards, out, load_section(params, "spectra", over), fresh=fresh)
    except (ValueError, OSError, StorageError) as exc:
        _fail(exc)
    typer.echo(json.dumps(result, indent=1))


@data_app.command("schedules", epilog=examples(
    "prism data schedules stats schedule.json --per-class --n-components 2"))
def schedules(stats: str = typer.Argument(..., help="folder of spectra .parquet files"),
              out: str = typer.Argument(..., help="schedule.json path or folder"),
              params: Optional[str] = PARAMS,
              n_components: Optional[int] = typer.Option(
                  None, help="Gaussian mixture components (default 4)"),
              per_class: Optional[bool] = typer.Option(
                  None, "--per-class/--global", help="one mixture per class label, or one "
                  "for all images (default --global)"),
              seed: Optional[int] = typer.Option(None, help="fit seed (default 0)")) -> None:
    """Fit the Gaussian mixture over per-image schedule parameters; save JSON."""
    from pipelines.data.schedule_model import fit_schedule_model

    over = {"n_components": n_components, "per_class": per_class, "seed": seed}
    try:
        fit_schedule_model(stats, out, load_section(params, "schedules", over),
                           log=typer.echo)  # its summary line is the result
    except (ValueError, OSError, StorageError) as exc:
        _fail(exc)
