"""Fresh compiles of tracr's own programs for the tests (run_scripts/compile_tracr.py, in process).

Needs the Tracr compiler (``pip install tracr-pypi``, pulls JAX). Without it the tests that compile
skip, except under ``EDGEPRUNE_REQUIRE_TRACR=1`` (CI installs it), where they fail.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("EDGEPRUNE_REQUIRE_TRACR") == "1"


def have_tracr() -> bool:
    return importlib.util.find_spec("tracr") is not None


def require_tracr() -> None:
    if have_tracr():
        return
    if REQUIRED:
        pytest.fail("EDGEPRUNE_REQUIRE_TRACR=1 but the Tracr compiler is not installed (pip install tracr-pypi)")
    pytest.skip("tracr (pip install tracr-pypi; pulls jax) is not installed")


@lru_cache(maxsize=None)
def compile_script():
    spec = importlib.util.spec_from_file_location("compile_tracr", ROOT / "run_scripts" / "compile_tracr.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@lru_cache(maxsize=1)
def _out_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="edgeprune_tracr_"))
    atexit.register(shutil.rmtree, path, True)
    return path


@lru_cache(maxsize=None)
def fresh_compile(name: str) -> tuple[Path, dict]:
    """(artifact folder, the compile script's ``build`` output) of a program compiled now, once per session."""
    require_tracr()
    script = compile_script()
    built = script.build(name)
    script.write(name, built, _out_dir())
    return _out_dir() / name, built
