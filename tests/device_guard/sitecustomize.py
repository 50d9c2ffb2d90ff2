"""Loaded by Python at start when this folder is on PYTHONPATH (tests/test_gpu_check.py): refuses
the top-level modules named in $CELLJEPA_BLOCKED_IMPORTS (bench/gpu_wheels.blocked_imports: what
the GPU machine neither has nor gets carried), in this process and every child it starts, so a CPU
run shows that the device-side steps import nothing missing there."""
import os
import sys
from importlib.machinery import PathFinder

_BLOCKED = frozenset(filter(None, os.environ.get("CELLJEPA_BLOCKED_IMPORTS", "").split(",")))


class _NotOnDevice:
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] not in _BLOCKED:
            return None
        if path is None:  # a copy vendored by an allowed package (setuptools' more_itertools) is there too
            spec = PathFinder.find_spec(fullname, [p for p in sys.path if "/_vendor" in p])
            if spec is not None:
                return spec
        elif any("/_vendor" in p for p in path):
            return None
        raise ModuleNotFoundError(f"No module named {fullname!r} (not on the GPU machine)", name=fullname)


if _BLOCKED:
    sys.meta_path.insert(0, _NotOnDevice())
