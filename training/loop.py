"""The training loop: one function that reads top to bottom.

``train(cfg, callbacks, resume_from, checkpoint_dir, run_dir)`` runs in one process, under
``torchrun`` (it joins the process group from the environment) and inside a Ray Train worker
(the group already exists); the launchers only choose the callbacks and where checkpoints go.
Progress is counted in images seen; every micro-batch is seeded from (seed, step, slot) so a
resumed run is exactly the run that was not interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common.run_config import Config
from components.artifact import save_model
from training import parts
from training.build import build_model, build_objective, param_groups
from training.callbacks import Callback, Callbacks
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data import MemoryData, build_data
from training.graphs import use_training_graphs
from training.sampling import generative_model, load_schedule_model, sample_grid


def train(cfg: Config, callbacks: list[Callback] | tuple[Callback, ...] = (),
          resume_from: str | Path | None = None, checkpoint_dir: str | Path | None = None,
          run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg``; return the final metrics (step, images_seen, loss, model_dir)."""
    cb = Callbacks(callbacks)
    run_dir = Path(run_dir or Path(cfg.run.output_dir) / cfg.run.name)
    checkpoint_dir = Path(checkpoint_dir or run_dir / "checkpoints")

    # -- processes and device
    ctx = parts.distributed_context()
    device = parts.pick_device(cfg, ctx)
    channels_last = parts.switch(cfg.run.channels_last, device)
    accum = cfg.train.grad_accum
    if cfg.train.batch_size % (ctx.world * accum):
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by "
                         f"world size x grad_accum = {ctx.world * accum}")
    micro = cfg.train.batch_size // (ctx.world * accum)  # images per forward on each rank

    # -- model, EMA, optimizer, objective
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    net, family, _ = build_model(cfg)
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).train(False).requires_grad_(False)
    opt = parts.make_optimizer(cfg, param_groups(net, cfg.optim.weight_decay), device)
    objective = build_objective(cfg)

    # -- data
    data = build_data(cfg, ctx.rank, ctx.world, micro, device)
    spectral = load_schedule_model(cfg, data.params if isinstance(data, MemoryData) else None) \
        if ctx.rank == 0 else None

    # -- resume: weights, EMA, optimizer, RNGs, data position
    step, images_seen, data_note, seconds = 0, 0, None, 0.0
    if resume_from is not None:
        state = load_checkpoint(resume_from, net, ema, opt)
        step, images_seen = int(state["step"]), int(state["images_seen"])
        seconds = float(state.get("train_seconds", 0.0))
        data_note = data.load_state_dict(state["data"], ctx.rank)

    # -- wrappers for DDP and speed (checkpoints and EMA use the raw ``net``)
    ddp = DistributedDataParallel(net) if ctx.world > 1 else None
    fwd = ddp or net
    compiled = parts.switch(cfg.run.compile, device)
    if compiled:
        # one static graph per input shape: SSD trains on several resolution pairs, and
        # automatic dynamic shapes would turn its int arguments symbolic (slow, recompiling)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if cfg.run.compile_scope == "blocks":
            parts.compile_blocks(net, cfg.run.compile_mode)
        else:
            fwd = torch.compile(fwd, dynamic=False, mode=cfg.run.compile_mode)
    graphs = compiled and device.type == "cuda" and \
        cfg.run.compile_mode in ("reduce-overhead", "max-autotune")
    if cfg.run.cuda_graphs == "on":  # eager kernels recorded per input shape (off CUDA: eager)
        if ddp is not None or accum > 1:
            raise ValueError("run.cuda_graphs=on runs one process without gradient "
                             "accumulation; else use run.compile_mode=reduce-overhead")
        fwd = use_training_graphs(net)
    cb.on_start(cfg, {"rank": ctx.rank, "world": ctx.world, "device": str(device),
                      "run_dir": str(run_dir), "start_step": step, "data_note": data_note,
                      "total_steps": cfg.total_steps, "family": family,
                      "parameters": sum(p.numel() for p in net.parameters())})

    def export(directory: Path) -> Path:  # the EMA model, with how far training had come
        d = save_model(directory, generative_model(cfg, ema, spectral),
                       training=cfg.public_dump())
        (d / "progress.json").write_text(json.dumps(progress()))
        return d

    # where the seconds were measured: a run's training time compares only on one kind of chip
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type

    def progress() -> dict[str, float | str | None]:
        return {"step": step, "images_seen": images_seen, "train_seconds": clock.seconds,
                "device": chip, "world": ctx.world,
                "first_step_s": clock.first_step_s,
                "train_flops": None if flops is None else flops * images_seen,
                "flops_per_image": flops}

    # -- the loop
    start_step = step
    loss_sum, n_logged = torch.zeros((), device=device), 0
    window_t = time.perf_counter()
    window_images = 0
    metrics: dict[str, float] = {}
    clock = parts.TrainingClock(device, seconds)
    flops: float | None = None  # training FLOPs per image, measured at the first step
    snapshot_images = [float(m) for m in cfg.checkpoint.snapshot_images]
    while step < cfg.total_steps:
        lr = parts.learning_rate(cfg, images_seen)
        for group in opt.param_groups:
            group["lr"] = lr
        if graphs:  # the graphs' outputs of the last step are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        parts.watch_syncs(cfg, device, step > start_step)  # run.sync_debug
        for a in range(accum):  # gradient accumulation; DDP syncs on the last micro-step
            slot = ctx.rank * accum + a
            batch = data.batch(step, slot)
            if flops is None and cfg.train.count_flops:
                flops = parts.step_flops_per_image(objective, net, batch, cfg, device)
            torch.manual_seed(parts.step_seed(cfg.run.seed, step, slot))  # after the data
            if channels_last:
                batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
            no_sync = ddp.no_sync() if ddp is not None and a < accum - 1 \
                else contextlib.nullcontext()
            with no_sync:
                with parts.autocast(cfg, device):
                    loss, _ = objective(fwd, batch)
                (loss / accum).backward()
            loss_sum += loss.detach().float() / accum
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        parts.ema_update(ema, net, step, cfg)
        parts.watch_syncs(cfg, device, False)
        step, images_seen = step + 1, images_seen + cfg.train.batch_size
        n_logged, window_images = n_logged + 1, window_images + cfg.train.batch_size
        seconds_before = clock.seconds
        clock.step_done()
        cb.on_step(step, images_seen)
        last = step == cfg.total_steps

        # -- metrics (all ranks take part in the mean of the loss)
        if parts.crossed(images_seen, cfg.train.batch_size, cfg.train.log_every_images) or last:
            loss_mean = float(parts.all_mean(loss_sum / n_logged, ctx))
            seconds = time.perf_counter() - window_t
            metrics = {"loss": loss_mean, "lr": lr, "grad_norm": float(grad_norm),
                       "images_seen": float(images_seen),
                       "images_per_second": window_images / max(seconds, 1e-9),
                       "memory_gib": parts.peak_memory_gib(device),
                       "train_seconds": clock.seconds}
            if flops is not None:
                metrics.update(gflops_per_image=flops / 1e9, train_flops=flops * images_seen)
            if clock.first_step_s is not None and n_logged == step - start_step:
                metrics["first_step_s"] = clock.first_step_s  # this process's first window
            cb.on_metrics(step, metrics)
            limit = cfg.train.time_limit_s  # every rank takes rank 0's decision
            if limit and float(parts.all_mean(torch.tensor(
                    float(ctx.rank == 0 and clock.seconds > limit),
                    device=device), ctx)) > 0:
                last = True
            loss_sum.zero_()
            n_logged, window_t, window_images = 0, time.perf_counter(), 0

        # -- snapshots of the EMA model along the run (rank 0)
        before = images_seen - cfg.train.batch_size
        if ctx.rank == 0 and (
                parts.crossed_any(before, images_seen, snapshot_images)
                or parts.crossed_any(seconds_before, clock.seconds,
                                     cfg.checkpoint.snapshot_seconds)
                or (flops is not None and parts.crossed_any(
                    flops * before, flops * images_seen, cfg.checkpoint.snapshot_flops))):
            with clock.paused():
                export(run_dir / "snapshots" / f"{images_seen:012d}")

        # -- sample grids from the EMA weights at fixed seeds (rank 0)
        if ctx.rank == 0 and cfg.sampling.num_images and (
                last or parts.crossed(images_seen, cfg.train.batch_size,
                                      cfg.sampling.every_images)):
            with clock.paused():
                grid = sample_grid(cfg, generative_model(cfg, ema, spectral), device)
            cb.on_images(step, "samples", grid)

        # -- checkpoint: every rank's data position, written by rank 0
        if parts.crossed(images_seen, cfg.train.batch_size, cfg.checkpoint.every_images) \
                or last:
            data_states = [data.state_dict()]
            if ctx.world > 1:
                data_states = [None] * ctx.world
                dist.all_gather_object(data_states, data.state_dict())
            path = None
            if ctx.rank == 0:
                with clock.paused():
                    state = {"step": step, "images_seen": images_seen, "data": data_states,
                             "world": ctx.world, "config": cfg.public_dump(),
                             "train_seconds": clock.seconds}
                    path = save_checkpoint(checkpoint_dir, step, net, ema, opt, state,
                                           cfg.checkpoint.keep_last)
            cb.on_checkpoint(step, path, metrics)
        if last:
            break

    # -- the end: export the EMA model (rank 0)
    model_dir = None
    if ctx.rank == 0:
        with clock.paused():
            model_dir = export(run_dir / "model")
    result = {**metrics, "step": step, "images_seen": images_seen,
              "model_dir": None if model_dir is None else str(model_dir)}
    cb.on_end(result, model_dir)
    return result
