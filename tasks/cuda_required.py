"""A run that was given GPUs fails at once when CUDA cannot use them (a node whose NVIDIA driver is
older than the image's CUDA build of torch needs, a missing device plugin), instead of planning for
the CPU and holding the GPUs for hours. The Kubernetes GPU job template sets PREFTUNE_REQUIRE_CUDA=1;
the flow calls `require_cuda_if_asked()` first (or `python -m tasks.cuda_required` checks by hand)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping

from tasks.base import PreftuneError

REQUIRE_CUDA = "PREFTUNE_REQUIRE_CUDA"


def required_devices(environ: Mapping[str, str] = os.environ) -> int:
    """How many CUDA devices the environment asks for: 0 (unset, empty, `0` or `false`), or N >= 1."""
    value = environ.get(REQUIRE_CUDA, "").strip().lower()
    if value in ("", "0", "false"):
        return 0
    if value == "true":
        return 1
    if not value.isdigit():
        raise PreftuneError(f"{REQUIRE_CUDA} must be a number of CUDA devices (e.g. 1) or 0, not {value!r}")
    return int(value)


def require_cuda_if_asked(environ: Mapping[str, str] = os.environ) -> None:
    """Raise PreftuneError when fewer CUDA devices work than PREFTUNE_REQUIRE_CUDA asks for, with
    torch's own reason (it only warns, e.g. "The NVIDIA driver on your system is too old")."""
    wanted = required_devices(environ)
    if not wanted:
        return
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found >= wanted:
        return
    reasons = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()))
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
    raise PreftuneError(
        f"{REQUIRE_CUDA}={wanted}: this job was given GPUs, but torch {torch.__version__} (built for {build}) sees "
        f"{found} CUDA device(s){f': {reasons}' if reasons else ''}. Check the node's NVIDIA driver and device plugin "
        "against the image's torch build (the Dockerfile's TORCH_INDEX_URL builds for older drivers)"
    )


if __name__ == "__main__":
    try:
        require_cuda_if_asked()
    except PreftuneError as error:
        print(f"preftune: {error}", file=sys.stderr)
        sys.exit(2)
