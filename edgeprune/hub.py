"""Loading from a local directory or the HF hub, with one-line errors instead of tracebacks.

``transformers`` reports a missing path, an unreachable hub, a gated repository or a pickled
checkpoint that ``torch.load(weights_only=True)`` refuses with deep tracebacks (and, offline, after
a minute of retries). ``loading(name, what)`` turns them into a ``LoadError`` naming the path and
what to do; the CLI prints it in one line and exits with status 2.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from pathlib import Path


class LoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names it and what to do."""


def looks_local(name: str) -> bool:
    """A path rather than a hub id ('gpt2', 'org/name'): absolute, ./ ../ ~, or several components."""
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..")
            or name.count("/") >= 2 or os.sep != "/" and os.sep in name)


def check_exists(name: str, what: str) -> None:
    if looks_local(name) and not Path(name).expanduser().exists():
        raise LoadError(f"{what} path {name!r} does not exist (a local directory saved with save_pretrained, "
                        "or a hub id such as 'gpt2')")


@contextlib.contextmanager
def loading(name: str, what: str = "model"):
    """Run a ``from_pretrained`` inside; its failures become one ``LoadError`` line."""
    check_exists(str(name), what)
    try:
        yield
    except LoadError:
        raise
    except (OSError, ValueError, RuntimeError, ImportError, KeyError, pickle.UnpicklingError) as err:
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(err).strip().splitlines() or [type(err).__name__])[0])
        local = Path(str(name)).expanduser().exists()
        if "weights_only" in str(err) or "Weights only load failed" in str(err) or isinstance(err, pickle.UnpicklingError):
            first = "its weights are a pickle (.bin) that a weights-only load refuses (weights_only=True)"
            hint = ("edgeprune never unpickles untrusted files: if you trust the file, load its state dict once "
                    "yourself (torch.load(..., weights_only=False)) and re-save it as safetensors with "
                    "save_pretrained")
        elif local:
            hint = "is it a directory written by save_pretrained (config.json + weights)?"
        else:
            hint = ("not a local path, and the hub did not answer (offline? set HF_HUB_OFFLINE=1 to fail fast); "
                    "pass a local directory saved with save_pretrained")
        raise LoadError(f"cannot load {what} {str(name)!r}: {first[:300]} -- {hint}") from None


def quiet_progress(progress: bool) -> None:
    """Without progress bars (``--no-progress``), HF's own ('Loading weights', downloads) go too."""
    if not progress:
        # heavy: transformers and huggingface_hub load only when asked
        import huggingface_hub.utils as hub_utils
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
