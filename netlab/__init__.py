"""The NAT test lab: real Linux NATs built from network namespaces and nftables.

:mod:`netlab.lab` builds the lab (``Lab``, sites of each NAT profile,
hosts that run processes); :mod:`netlab.udp` probes it with plain UDP
sockets (a reflector and a remote-controlled endpoint).

The lab is a test tool that needs root, so it lives beside ``punchd`` in the
repository and never ships in punchd's wheel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: The directory holding this package: what ``python -m netlab.program`` needs
#: on its path when it starts in a namespace from some other directory.
SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with L{SOURCE_ROOT} first on ``PYTHONPATH``."""
    result = dict(os.environ if env is None else env)
    rest = [p for p in result.get("PYTHONPATH", "").split(os.pathsep) if p and p != SOURCE_ROOT]
    result["PYTHONPATH"] = os.pathsep.join([SOURCE_ROOT, *rest])
    return result
