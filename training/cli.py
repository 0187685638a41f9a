"""``prism train CONFIG [--section a.b] [--set key=value ...] [--ray --workers N [--gpu]]``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from common.run_config import ConfigError, load_config


def train_command(
    config: Path = typer.Argument(..., help="training config YAML (see training/configs/)"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set optim.lr=1e-4"),
    section: str = typer.Option(None, "--section",
                                help="dotted sub-mapping of CONFIG holding the sections, e.g. "
                                     "models.demo-v of params.yaml"),
    ray: bool = typer.Option(False, "--ray", help="run on Ray Train (RAY_ADDRESS or local)"),
    workers: int = typer.Option(1, "--workers", min=1, help="Ray Train workers"),
    gpu: bool = typer.Option(False, "--gpu", help="one GPU per Ray Train worker"),
    storage: str = typer.Option(None, "--storage",
                                help="Ray Train storage path (local dir or s3://...)"),
    max_failures: int = typer.Option(3, "--max-failures", min=0,
                                     help="Ray Train: worker failures tolerated"),
) -> None:
    """Train a model. One process (or each process of torchrun) by default; the same loop on
    Ray Train with --ray. The same run name resumes from its latest checkpoint.

    Examples:

      prism train training/configs/debug.yaml --set run.output_dir=runs

      prism train params.yaml --section models.demo-v

      prism train training/configs/cifar10-ddpm-eps.yaml --ray --workers 4 --gpu
    """
    try:
        cfg = load_config(config, set_, section=section)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    # deferred: the loop imports torch (~1.5 s): a run loads it, --help does not
    from training.launch import run_local, run_ray

    if ray:
        result = run_ray(cfg, workers, use_gpu=gpu, storage_path=storage,
                         max_failures=max_failures)
    else:
        result = run_local(cfg)
    typer.echo(json.dumps(result, indent=1, default=str))
