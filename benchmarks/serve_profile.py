"""Where a served request's time goes on this machine (a diagnostic, not a target).

    python benchmarks/serve_profile.py --model DIR_OR_URI [--steps 16]

Offline ``generate`` at batch 1 and 32 in the main thread and in a worker thread with one
torch thread (as the replica runs it), then the service under concurrency 1 and 32 with the
replica's server-side timings, and, when py-spy is installed, a sampled profile of the replica
process (raw stacks in $OUT).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import torch
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import local_service  # noqa: E402

from components.generate import generate  # noqa: E402
from serving.loading import load_served_model, normalize_uri  # noqa: E402


def pid_of(word: str) -> int | None:
    """The first process whose command line contains ``word`` (Ray names its actors' processes
    ``ray::ServeReplica:APP:DEPLOYMENT``, ``ray::ProxyActor``)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if word.encode() in cmd:
                return int(d.name)
    return None


def med(fn, n: int = 7) -> float:
    fn()
    ts = []
    for _ in range(n):
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def gil_summary(raw: Path, top: int = 6) -> dict[str, Any]:
    """From a ``py-spy record --threads --gil -f raw`` file: the share of samples in which each
    thread held the GIL, and the commonest frames of the holders other than the generating
    (``ThreadPoolExecutor``) thread: what competes with the kernel launches."""
    per_thread: Counter[str] = Counter()
    others: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        name = frames[0].split(":", 1)[-1].strip() or frames[0]
        per_thread[name] += int(n)
        total += int(n)
        if "ThreadPoolExecutor" not in name:
            for fr in frames[-3:]:
                others[fr] += int(n)
    return {"samples_with_gil": total, "by_thread": dict(per_thread.most_common()),
            "other_threads_top_frames": dict(others.most_common(top))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-wait", type=float, default=None)
    ap.add_argument("--replica-only", action="store_true",
                    help="only the replica's own generate timings (default, GC off, 8 torch "
                         "threads) against offline in this process, no load, no py-spy")
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "outputs/bench"))
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    uri = normalize_uri(args.model)
    model, _ = load_served_model(uri, device)
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" \
        else contextlib.nullcontext
    res: dict = {"offline": {}}

    def gen(b: int) -> None:
        with ac():
            generate(model, seeds=list(range(b)), steps=args.steps, device=device)

    pool = ThreadPoolExecutor(1)
    for b in (1, 32):
        res["offline"][f"main_b{b}"] = med(lambda b=b: gen(b))
        res["offline"][f"thread_b{b}"] = med(lambda b=b: pool.submit(gen, b).result())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the replica (num_cpus: 1)
    for b in (1, 32):
        res["offline"][f"main_1thread_b{b}"] = med(lambda b=b: gen(b))
    torch.set_num_threads(threads)
    print(json.dumps(res["offline"], indent=1), flush=True)
    spy = shutil.which("py-spy")
    with local_service(uri, 32, args.batch_wait) as url:
        pids = {k: pid_of(w) for k, w in (("sampler", "ServeReplica:prism:Sampler"),
                                          ("ingress", "ServeReplica:prism:Ingress"),
                                          ("proxy", "ProxyActor"))}

        def one(i: int) -> dict:
            t = time.perf_counter()
            r = requests.post(f"{url}/v1/generate", timeout=600,
                              json={"seeds": [i], "steps": args.steps, "format": "json"})
            r.raise_for_status()
            return dict(r.json()["timings"], client_s=time.perf_counter() - t,
                        batch=r.json()["batch_images"])

        handle = serve.get_deployment_handle("Sampler", app_name="prism")
        if args.replica_only:
            for rep in range(2):
                for name, kw in (("default", {}), ("gc_off", {"gc_off": True}),
                                 ("threads8", {"threads": 8})):
                    t = handle.time_generate.remote(32, args.steps, 5, **kw).result()
                    res[f"replica_{name}_{rep}"] = t
                    print(f"replica {name:9s} worker {t['worker_thread_s']:.4f} loop "
                          f"{t['event_loop_thread_s']:.4f}", flush=True)
                off = med(lambda: gen(32))
                res["offline"][f"again_main_b32_{rep}"] = off
                print(f"offline main b32 {off:.4f}", flush=True)
            (out / "serve_profile.json").write_text(json.dumps(res, indent=1))
            return
        for b in (1, 32):  # the same call inside the replica, then offline again
            res[f"replica_b{b}"] = handle.time_generate.remote(b, args.steps, 5).result()
            res["offline"][f"again_main_b{b}"] = med(lambda b=b: gen(b))
            print(b, res[f"replica_b{b}"], res["offline"][f"again_main_b{b}"], flush=True)
        for c in (1, 32):
            with ThreadPoolExecutor(c) as cp:
                list(cp.map(one, range(2 * c)))
                rows: list[dict] = []
                # the replica: every sample (--idle), then only samples holding the GIL
                for mode in ("idle", "gil"):
                    procs = [subprocess.Popen(
                        [spy, "record", "-p", str(pid), "-d", "6", "-r", "250", "-f", "raw",
                         "-o", str(out / f"spy_{name}_c{c}_{mode}.txt"), "--threads",
                         f"--{mode}", "--nonblocking"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.STDOUT)
                        for name, pid in pids.items() if spy and pid and name == "sampler"]
                    t0 = time.time()
                    while time.time() - t0 < 7:
                        rows += list(cp.map(one, range(c)))
                    for proc in procs:
                        proc.wait()
            res[f"c{c}"] = {k: statistics.median(r[k] for r in rows)
                            for k in ("queue_s", "generate_s", "total_s", "client_s", "batch")}
            res[f"c{c}"]["requests"] = len(rows)
            gil = out / f"spy_sampler_c{c}_gil.txt"
            if gil.is_file():
                res[f"c{c}_gil"] = gil_summary(gil)
                print(json.dumps(res[f"c{c}_gil"], indent=1), flush=True)
            res[f"c{c}_calls"] = sorted({(round(r["generate_s"], 4), r["batch"]) for r in rows})
            print(c, res[f"c{c}"], flush=True)
    (out / "serve_profile.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
