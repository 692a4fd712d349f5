"""Harness that runs transformers' own test mixins against this package (reference/transformers-v5.md §11.1).

The mixins (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`) are not part of the transformers wheel, only of
its sdist. `build_harness()`:

1. downloads the sdist of the *installed* transformers version with pip into `<repo>/.cache/hf_harness/` (git-ignored;
   reused when already there, so later runs work offline);
2. extracts `tests/test_modeling_common.py`, `tests/test_configuration_common.py` and `tests/test_training_mixin.py`
   into the package `<repo>/.cache/hf_harness/transformers-<version>/hf_upstream_tests/`;
3. adds the project-authored stand-ins for the files the sdist does not ship (sources in `tests/hf_standins/`):
   `exporters/test_export.py` (empty `ExportTesterMixin`), `utils/test_configuration_utils.py`
   (`config_common_kwargs`) and `generation/test_utils.py` (the project's `GenerationTesterMixin`, §11.3);
4. puts the harness folder on `sys.path`, so `import hf_upstream_tests.test_modeling_common` works.

The package is called `hf_upstream_tests`, not `tests`, so it can never shadow (or be shadowed by) this repository's
own `tests/` folder. Any failure raises `HarnessUnavailable` with the reason; the test module turns it into a failing
test (never a skip).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "hf_harness"
STANDINS_DIR = Path(__file__).resolve().parent / "hf_standins"
PACKAGE = "hf_upstream_tests"

# Files taken verbatim from the sdist (`tests/<name>` -> `<PACKAGE>/<name>`).
UPSTREAM_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py")
# Project-authored stand-ins (`tests/hf_standins/<source>` -> `<PACKAGE>/<target>`).
STANDINS = {
    "export.py": "exporters/test_export.py",
    "configuration_utils.py": "utils/test_configuration_utils.py",
    "generation.py": "generation/test_utils.py",
}

# pytest markers used by the mixins' decorators (§11.1 step 3). Registered by tests/conftest.py.
MARKERS = {
    "generate": "generation tests (transformers mixins)",
    "is_training_test": "training tests (transformers TrainingTesterMixin)",
    "is_tensor_parallel_test": "tensor-parallel tests (transformers mixins)",
    "is_expert_parallel_test": "expert-parallel tests (transformers mixins)",
    "is_fsdp_test": "FSDP tests (transformers mixins)",
    "flash_attn_test": "needs flash-attn 2",
    "flash_attn_3_test": "needs flash-attn 3",
    "flash_attn_4_test": "needs flash-attn 4",
    "all_flash_attn_test": "needs a flash-attn build",
    "bitsandbytes": "needs bitsandbytes",
    "slow": "long-running tests",
    "timeout": "per-test timeout (pytest-timeout)",
    "accelerate_tests": "accelerate offload/parallel tests",
    "torch_compile_test": "torch.compile tests",
    "torch_export_test": "torch.export tests",
}


class HarnessUnavailable(RuntimeError):
    """The transformers sdist (and so the upstream mixins) could not be obtained."""


def installed_transformers_version() -> str:
    import transformers

    return transformers.__version__


@contextlib.contextmanager
def _lock(path: Path):
    from filelock import FileLock  # a dependency of transformers / huggingface_hub

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=600):
        yield


def _sdist_path(version: str) -> Path | None:
    for suffix in (".tar.gz", ".zip"):
        candidate = CACHE_DIR / f"transformers-{version}{suffix}"
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    return None


def download_sdist(version: str) -> Path:
    """`pip download transformers==<version>` (source only) into the cache; returns the archive path."""
    cached = _sdist_path(version)
    if cached is not None:
        return cached
    env = dict(os.environ)
    env.pop("PIP_TARGET", None)  # would turn `pip download` into an error / install elsewhere
    env.pop("PIP_NO_INDEX", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", f"transformers=={version}",
            "--no-binary", ":all:", "--no-deps", "--no-build-isolation", "--quiet", "-d", tmp,
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise HarnessUnavailable(f"`{' '.join(cmd)}` could not run: {err}") from err
        archives = [p for p in Path(tmp).iterdir() if p.name.startswith("transformers-")]
        if proc.returncode != 0 or not archives:
            raise HarnessUnavailable(
                f"could not download the transformers=={version} sdist (needed for transformers' own test mixins).\n"
                f"command: {' '.join(cmd)}\nexit code: {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
            )
        target = CACHE_DIR / archives[0].name
        shutil.move(str(archives[0]), str(target))
    return target


def _extract_upstream(archive: Path, version: str, dest: Path) -> None:
    wanted = {f"tests/{name}": name for name in UPSTREAM_FILES}
    found: dict[str, bytes] = {}
    if archive.name.endswith(".zip"):
        import zipfile

        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                rel = member.split("/", 1)[-1]
                if rel in wanted:
                    found[wanted[rel]] = zf.read(member)
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                rel = member.name.split("/", 1)[-1]
                if rel in wanted and member.isfile():
                    found[wanted[rel]] = tf.extractfile(member).read()
    missing = sorted(set(UPSTREAM_FILES) - set(found))
    if missing:
        raise HarnessUnavailable(f"{archive} (transformers {version}) does not contain tests/{missing}")
    for name, data in found.items():
        (dest / name).write_bytes(data)


def _write_if_changed(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_harness() -> Path:
    """Create (or reuse) the harness and put it on `sys.path`. Returns the folder that holds `PACKAGE`."""
    version = installed_transformers_version()
    root = CACHE_DIR / f"transformers-{version}"
    pkg = root / PACKAGE
    with _lock(CACHE_DIR / "harness"):
        if not all((pkg / name).is_file() for name in UPSTREAM_FILES):
            archive = download_sdist(version)
            staging = Path(tempfile.mkdtemp(dir=CACHE_DIR))
            try:
                _extract_upstream(archive, version, staging)
                pkg.mkdir(parents=True, exist_ok=True)
                for name in UPSTREAM_FILES:
                    os.replace(staging / name, pkg / name)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        # Stand-ins are refreshed from the repository on every run (cheap; content-compared).
        for folder in ("", "exporters", "utils", "generation"):
            _write_if_changed(pkg / folder / "__init__.py", b"")
        for source, target in STANDINS.items():
            _write_if_changed(pkg / target, (STANDINS_DIR / source).read_bytes())
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root

