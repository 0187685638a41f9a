"""``prism eval ...``: the evaluate stage, the feature-network stage, and direct comparisons.

``prism eval run MODEL --real SRC`` reads the ``eval:`` section of ``--params`` (an
:class:`pipelines.evaluation.evaluate.EvalConfig`) when given; options on the command line
override it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
import yaml
from pydantic import ValidationError

from common.cli_help import examples

eval_app = typer.Typer(help="Evaluation: metrics of a model's samples, the feature network.",
                       no_args_is_help=True)


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2) from None


def _ints(text: Optional[str], name: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None


def _config(params: Optional[str], over: dict[str, Any]) -> Any:
    # deferred: the evaluation stages import torch (~1.5 s): each command loads its own, so
    # that --help stays fast
    from pipelines.evaluation.evaluate import EvalConfig

    base: dict[str, Any] = {}
    if params:
        doc = yaml.safe_load(Path(params).read_text()) or {}
        base = dict(doc.get("eval") or {})
    base.update({k: v for k, v in over.items() if v is not None})
    try:
        return EvalConfig(**base)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"eval config field {field!r}: {err['msg']}") from None


@eval_app.command("run", epilog=examples(
    "prism eval run runs/debug/model --real shards --out eval --n 64 --steps 8,16 --no-mlflow",
    "prism eval run models:/prism-demo-v@champion --real shards --params params.yaml",
    "prism eval run runs/my-photos/model --real shards --schedules model,spectral "
    "--sampler dpmpp_2m --feature-net nets/feature_net.safetensors"))
def run(model: str = typer.Argument(..., help="model directory, runs:/ID/model or models:/N@A"),
        real: Optional[str] = typer.Option(None, help="held-out real images (shards, tar, "
                                                       "folder, npz)"),
        out: Optional[str] = typer.Option(None, help="output folder"),
        params: Optional[str] = typer.Option(None, help="params.yaml with an eval: section"),
        n: Optional[int] = typer.Option(None, "--n", help="images per setting"),
        steps: Optional[str] = typer.Option(None, help="comma-separated, e.g. 8,16,32,64"),
        schedules: Optional[str] = typer.Option(None, help="comma-separated: model,spectral"),
        sampler: Optional[str] = typer.Option(None, help="ddim, ddpm, dpmpp_2m or dpmpp_2m_full "
                                              "(default ddim)"),
        seed: Optional[int] = typer.Option(None, help="first seed"),
        cfg_scale: Optional[float] = typer.Option(None, help="classifier-free guidance "
                                                  "scale of class-conditional models "
                                                  "(default 1: off)"),
        feature_net: Optional[str] = typer.Option(None, help="in-house feature net .safetensors"),
        inception: Optional[str] = typer.Option(None, help="pt_inception-2015-12-05 weights: "
                                                           "enables standard FID"),
        train_images: Optional[str] = typer.Option(None, help="training images: memorisation"),
        max_real: Optional[int] = typer.Option(None, help="real images used at most "
                                               "(a seeded random subset)"),
        batch_size: Optional[int] = typer.Option(None, help="images per sampling batch "
                                                 "(default 250)"),
        device: Optional[str] = typer.Option(None, help="cpu (default) or cuda"),
        mlflow: Optional[bool] = typer.Option(None, "--mlflow/--no-mlflow",
                                              help="log to the model's MLflow run")) -> None:
    """Sample at fixed seeds and write metrics.json, metrics_table.json/.md and plots."""
    from pipelines.evaluation.evaluate import run_evaluate

    try:
        over = {"model": model, "real": real, "out_dir": out, "n_images": n,
                "steps": _ints(steps, "steps"), "sampler": sampler, "seed": seed,
                "schedules": schedules.split(",") if schedules else None,
                "cfg_scale": cfg_scale, "feature_net": feature_net, "inception": inception,
                "train_images": train_images, "max_real": max_real, "batch_size": batch_size,
                "device": device, "mlflow": mlflow}
        cfg = _config(params, over)
        top = run_evaluate(cfg)
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"wrote {Path(cfg.out_dir) / 'metrics.json'} ({len(top['settings'])} settings)")


@eval_app.command("feature-net", epilog=examples(
    "prism eval feature-net train.npz --test test.npz --out nets/debug --debug",
    "prism eval feature-net shards --test test-shards --out nets/mine --device cuda"))
def feature_net(train: str = typer.Argument(..., help="labelled training images"),
                test: Optional[str] = typer.Option(None, help="labelled test images"),
                out: str = typer.Option("outputs/feature_net", help="output folder"),
                name: str = typer.Option("feature_net", help="file name of the weights "
                                         "(<name>.safetensors)"),
                width: Optional[int] = typer.Option(None, help="base channel width "
                                                    "(default 64)"),
                epochs: Optional[int] = typer.Option(None, help="training epochs "
                                                     "(default 24)"),
                seed: int = typer.Option(0, help="training seed"),
                device: str = typer.Option("cpu", help="cpu or cuda"),
                debug: bool = typer.Option(False, help="the tiny debug recipe (CPU, seconds)")
                ) -> None:
    """Train the in-house feature network (fixed recipe); writes weights + sidecar JSON."""
    from pipelines.evaluation.feature_net import (
        DEBUG_RECIPE,
        FeatureNetRecipe,
        run_feature_net_stage,
    )

    try:
        base = DEBUG_RECIPE if debug else FeatureNetRecipe()
        upd = {k: v for k, v in (("width", width), ("epochs", epochs)) if v is not None}
        recipe = FeatureNetRecipe(**{**base.model_dump(), **upd, "seed": seed})
        side = run_feature_net_stage(train, test, out, recipe, device, name)
    except ValidationError as exc:
        _fail(ValueError(f"recipe field {exc.errors()[0]['loc'][0]!r}: "
                         f"{exc.errors()[0]['msg']}"))
    except (ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(json.dumps({k: side.get(k) for k in ("metric_name", "test_accuracy", "sha256")}))


@eval_app.command("compare", epilog=examples(
    "prism eval compare samples.npz real.npz --out cmp",
    "prism eval compare samples real-shards --feature-net nets/feature_net.safetensors"))
def compare(generated: str = typer.Argument(..., help="images to judge (folder, npz, tar...)"),
            real: str = typer.Argument(..., help="reference images"),
            out: Optional[str] = typer.Option(None, help="write metrics.json here"),
            feature_net: Optional[str] = typer.Option(None, help="in-house feature net "
                                                      ".safetensors (FD-prism)"),
            inception: Optional[str] = typer.Option(None, help="pt_inception-2015-12-05 "
                                                    "weights: enables standard FID"),
            device: str = typer.Option("cpu", help="cpu or cuda")) -> None:
    """All metrics between two image sets that are already on disk (no sampling)."""
    from pipelines.evaluation.data import load_images
    from pipelines.evaluation.metrics import MetricSettings, compute_metrics, feature_spaces

    try:
        a, b = load_images(generated), load_images(real)
        spaces, status = feature_spaces(feature_net, inception, device)
        m = compute_metrics(a.as_float(), b.as_float(), settings=MetricSettings(),
                            spaces=spaces)
        m["standard_fid"] = status
    except (ValueError, OSError) as exc:
        _fail(exc)
    text = json.dumps(m, indent=1)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(text)
    typer.echo(json.dumps({"swd_x1e3": m["swd"]["mean"],
                           "log_rapsd_l1": m["spectral"]["log_rapsd_l1"],
                           "slope_difference": m["spectral"]["slope_difference"],
                           **({m["fd_prism"]["name"]: m["fd_prism"]["fd"]}
                              if "fd_prism" in m else {}),
                           "standard_fid": m["fid"]["fd"] if "fid" in m else "unavailable"}))
