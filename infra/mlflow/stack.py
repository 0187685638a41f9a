"""A production-shaped MLflow stack on one machine: PostgreSQL backend store, S3 artifacts.

    python infra/mlflow/stack.py up   --dir /tmp/mlflow-stack   # prints the env to export
    python infra/mlflow/stack.py down --dir /tmp/mlflow-stack

It starts (1) PostgreSQL from Debian's package in DIR/pg, (2) an S3-protocol server on
loopback (moto_server; point S3_ENDPOINT at a real S3/MinIO instead to skip it), and (3)
``mlflow server`` with ``--backend-store-uri postgresql://...`` and
``--artifacts-destination s3://BUCKET/mlflow``, proxying artifacts so that clients need no S3
credentials, behind MLflow's basic-auth app (``--app-name basic-auth``: every request but
``/health`` needs a user and password; its users live in the same PostgreSQL database). The
admin user is ``$MLFLOW_TRACKING_USERNAME`` (default ``admin``) with the password
``$MLFLOW_TRACKING_PASSWORD`` or, without it, a random one; ``up`` prints the exports a client
needs and keeps them in DIR/credentials.env (mode 600), never in stack.json. In production the
same ``mlflow server`` line runs against a managed PostgreSQL and a real bucket
(infra/README.md). Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def _health(url: str, timeout_s: float, log: Path,
            proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url/health`` answers 200 (the server has migrated its schema and serves);
    fail at once when ``proc`` (the server) has exited."""
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline and (proc is None or proc.poll() is None):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    tail = log.read_text()[-2000:] if log.exists() else ""
    why = f"exited ({proc.returncode})" if proc is not None and proc.poll() is not None \
        else f"not healthy within {timeout_s:.0f} s"
    raise RuntimeError(f"mlflow server at {url} {why}; its log ends with:\n{tail}")


def _start_postgres(root: Path, logs: Path) -> int:
    """initdb (first time only), start on a free loopback port, create database ``mlflow``."""
    pg_dir = root / "pg"
    port = _free_port()
    fresh = not (pg_dir / "PG_VERSION").exists()
    if fresh:
        subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", str(pg_dir), "-U", "mlflow",
                                     "--auth=trust", "-E", "UTF8"]), check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(pg_dir), "-l", str(logs / "pg.log"),
                                 "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                                 "-w", "start"]), check=True, stdout=subprocess.DEVNULL)
    if fresh:
        subprocess.run(_as_postgres([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port),
                                     "-U", "mlflow", "mlflow"]), check=True)
    return port


def _start_s3(env: dict[str, str], logs: Path, procs: dict[str, int]) -> str:
    """moto_server on a free loopback port (in-memory: its objects live until ``down``)."""
    port = _free_port()
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(logs / "s3.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    procs["s3"] = moto.pid
    _wait_port(port, 30, "moto_server")
    env.setdefault("AWS_ACCESS_KEY_ID", "testing")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    return f"http://127.0.0.1:{port}"


def _ensure_bucket(s3: str, bucket: str, env: dict[str, str]) -> None:
    import boto3  # the stack script is platform code: boto3 is fine here

    client = boto3.client("s3", endpoint_url=s3, region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                          aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"))
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)


def _admin(root: Path) -> tuple[str, str]:
    """The admin user and password: from the environment, from an earlier ``up`` in ``root``
    (the user store in PostgreSQL keeps the first password), or a new random password; written
    to ``root/credentials.env`` with mode 600."""
    creds = root / "credentials.env"
    saved = dict(line.removeprefix("export ").split("=", 1)
                 for line in creds.read_text().splitlines()) if creds.exists() else {}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or saved.get(
        "MLFLOW_TRACKING_USERNAME", "admin")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or saved.get(
        "MLFLOW_TRACKING_PASSWORD") or secrets.token_urlsafe(18)
    creds.touch(mode=0o600)
    creds.write_text(f"export MLFLOW_TRACKING_USERNAME={user}\n"
                     f"export MLFLOW_TRACKING_PASSWORD={password}\n")
    return user, password


def _auth_config(root: Path, database_uri: str, admin: str) -> Path:
    """MLflow's basic-auth settings: users and permissions in ``database_uri``; an
    authenticated user may read every experiment and model by default."""
    path = root / "basic_auth.ini"
    path.write_text("[mlflow]\ndefault_permission = READ\n"
                    f"database_uri = {database_uri}\nadmin_username = {admin}\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


def up(root: Path) -> dict[str, Any]:
    """Start PostgreSQL, S3 (unless ``S3_ENDPOINT`` is set) and ``mlflow server`` under
    ``root``; write and return ``root/stack.json`` (tracking URI, backend, artifact
    destination, S3 endpoint, bucket, pids). Everything started is stopped again on failure."""
    root = root.resolve()
    if (root / "stack.json").exists():
        raise RuntimeError(f"a stack is already up in {root} (stack.py down --dir {root} first)")
    try:
        import psycopg2  # noqa: F401  (mlflow server needs it for postgresql+psycopg2)
    except ImportError:
        raise RuntimeError("psycopg2 is missing: pip install -e '.[prod]'") from None
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    if os.geteuid() == 0:  # PostgreSQL runs as `postgres`: it needs its socket dir and log
        shutil.chown(root, "postgres")
        shutil.chown(logs, "postgres")
        if subprocess.run(_as_postgres(["test", "-w", str(root)])).returncode != 0:
            raise RuntimeError(f"PostgreSQL runs as user postgres, which cannot reach {root}: "
                               "use a directory whose parents it may enter (e.g. under /tmp)")
    procs: dict[str, int] = {}
    info: dict[str, Any] = {"pg_dir": str(root / "pg"), "pids": procs}
    try:
        pg_port = _start_postgres(root, logs)
        info["pg_port"] = pg_port
        env = dict(os.environ)
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        s3 = os.environ.get("S3_ENDPOINT") or _start_s3(env, logs, procs)
        env["MLFLOW_S3_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"] = s3
        bucket = os.environ.get("MLFLOW_BUCKET", "prism-mlflow")
        _ensure_bucket(s3, bucket, env)
        port = _free_port()
        backend = f"postgresql+psycopg2://mlflow@127.0.0.1:{pg_port}/mlflow"
        user, password = _admin(root)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(_auth_config(root, backend, user))
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = password  # read when the admin user is created
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))  # CSRF tokens
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
             "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", backend, "--artifacts-destination", f"s3://{bucket}/mlflow",
             "--workers", "1"],
            env=env, stdout=open(logs / "mlflow.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        procs["mlflow"] = server.pid
        url = f"http://127.0.0.1:{port}"
        info.update(MLFLOW_TRACKING_URI=url, backend_store_uri=backend,
                    artifacts_destination=f"s3://{bucket}/mlflow", s3_endpoint=s3,
                    bucket=bucket)
        (root / "stack.json").write_text(json.dumps(info, indent=2))
        _health(url, 180, logs / "mlflow.log", server)
    except BaseException:
        (root / "stack.json").write_text(json.dumps(info, indent=2))
        down(root)
        raise
    return info


def down(root: Path) -> None:
    """Stop what :func:`up` started in ``root`` (the processes by their recorded ids, then
    PostgreSQL); the PostgreSQL data directory stays, so a later ``up`` reuses it."""
    info_path = root / "stack.json"
    if info_path.exists():
        info = json.loads(info_path.read_text())
        for pid in info.get("pids", {}).values():
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        info_path.unlink()
    if (root / "pg" / "postmaster.pid").exists():
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(root / "pg"), "-m", "fast",
                                     "-w", "stop"]), stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--dir", type=Path, required=True)
    args = ap.parse_args()
    try:
        if args.action == "up":
            info = up(args.dir)
            print(f"export MLFLOW_TRACKING_URI={info['MLFLOW_TRACKING_URI']}")
            print((args.dir.resolve() / "credentials.env").read_text(), end="")
            print(json.dumps(info, indent=2), file=sys.stderr)
        else:
            down(args.dir)
    except (RuntimeError, subprocess.CalledProcessError) as err:
        sys.exit(f"stack.py {args.action}: {err}")


if __name__ == "__main__":
    main()
