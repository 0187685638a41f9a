"""A production-shaped MLflow stack on one machine: PostgreSQL backend store, S3 artifacts.

    python infra/mlflow/stack.py up   --dir /tmp/mlflow-stack   # prints the env to export
    python infra/mlflow/stack.py down --dir /tmp/mlflow-stack

It starts (1) PostgreSQL from Debian's package in DIR/pg, (2) an S3-protocol server on
loopback (moto_server; point S3_ENDPOINT at a real S3/MinIO instead to skip it), and (3)
``mlflow server`` with ``--backend-store-uri postgresql://...`` and
``--artifacts-destination s3://BUCKET/mlflow``, proxying artifacts so that clients need no S3
credentials. In production the same ``mlflow server`` line runs against a managed PostgreSQL
and a real bucket (infra/README.md). Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not open port {port} within {timeout_s:.0f} s")


def _pg_bin(name: str) -> str:
    for cand in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: install Debian's `postgresql` package")
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the `postgres` user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def up(root: Path) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    pg_dir, logs = root / "pg", root / "logs"
    logs.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(logs, "postgres")
    pg_port = _free_port()
    # 1. PostgreSQL
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(pg_dir), "-U", "mlflow",
                                 "--auth=trust", "-E", "UTF8"]), check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(pg_dir), "-l", str(logs / "pg.log"),
                                 "-o", f"-p {pg_port} -k {root} -c listen_addresses=127.0.0.1",
                                 "-w", "start"]), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(_as_postgres([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(pg_port),
                                 "-U", "mlflow", "mlflow"]), check=True)
    # 2. S3
    env = dict(os.environ)
    s3 = os.environ.get("S3_ENDPOINT")
    procs: dict[str, int] = {}
    if not s3:
        s3_port = _free_port()
        moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                                stdout=open(logs / "s3.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs["s3"] = moto.pid
        _wait_port(s3_port, 30, "moto_server")
        s3 = f"http://127.0.0.1:{s3_port}"
        env.setdefault("AWS_ACCESS_KEY_ID", "testing")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    env["MLFLOW_S3_ENDPOINT_URL"] = s3
    env["AWS_ENDPOINT_URL"] = s3
    import boto3  # the stack script is platform code: boto3 is fine here

    bucket = os.environ.get("MLFLOW_BUCKET", "prism-mlflow")
    client = boto3.client("s3", endpoint_url=s3, region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                          aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"))
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    # 3. MLflow tracking server
    port = _free_port()
    backend = f"postgresql+psycopg2://mlflow@127.0.0.1:{pg_port}/mlflow"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", backend, "--artifacts-destination", f"s3://{bucket}/mlflow",
         "--workers", "1"],
        env=env, stdout=open(logs / "mlflow.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    procs["mlflow"] = server.pid
    try:
        _wait_port(port, 120, "mlflow server")
    except RuntimeError as err:
        tail = (logs / "mlflow.log").read_text()[-2000:]
        raise RuntimeError(f"{err}; its log ends with:\n{tail}") from None
    info = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "backend_store_uri": backend,
            "artifacts_destination": f"s3://{bucket}/mlflow", "s3_endpoint": s3,
            "pg_dir": str(pg_dir), "pids": json.dumps(procs)}
    (root / "stack.json").write_text(json.dumps(info, indent=2))
    return info


def down(root: Path) -> None:
    info_path = root / "stack.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        for pid in json.loads(info["pids"]).values():
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    if (root / "pg").exists():
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(root / "pg"), "-m", "fast",
                                     "-w", "stop"]), stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--dir", type=Path, required=True)
    args = ap.parse_args()
    if args.action == "up":
        info = up(args.dir)
        print(f"export MLFLOW_TRACKING_URI={info['MLFLOW_TRACKING_URI']}")
        print(json.dumps(info, indent=2), file=sys.stderr)
    else:
        down(args.dir)


if __name__ == "__main__":
    main()
