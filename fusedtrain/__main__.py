"""Command-line tools: `python -m fusedtrain info` and `python -m fusedtrain compare`."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

import fusedtrain
from fusedtrain import _dispatch, _extension, compare


def info_lines() -> list[str]:
    """What this installation can run, one fact per line."""
    lines = [
        f"fusedtrain {fusedtrain.__version__}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"python {platform.python_version()} on {platform.machine()}",
    ]
    if _extension.native_available():
        c = _extension._C
        lines.append(f"native extension: built ({c.__file__})")
        lines.append(f"  CPU kernels: yes, instruction set {c.cpu_isa()} "
                     f"(this CPU supports: {', '.join(c.supported_cpu_isas())})")
        lines.append(f"  CUDA kernels: {'yes' if 'cuda' in _dispatch.NATIVE_DEVICES else 'not built'}")
    else:
        lines.append(f"native extension: not available ({_extension.LOAD_ERROR})")
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    lines.append(f"triton: {'installed' if _dispatch.TRITON_INSTALLED else 'not installed'}")
    env = os.environ.get("FUSEDTRAIN_BACKEND")
    for device in [torch.device("cpu")] + ([torch.device("cuda")] if cuda else []):
        try:
            picked = _dispatch.resolve("auto", device)
        except (RuntimeError, ValueError) as error:
            lines.append(f"backend 'auto' on {device.type}: unusable ({error})")
            continue
        why = (f"FUSEDTRAIN_BACKEND={env}" if env and env != "auto" else
               "native kernels built for this device" if picked == "native" else
               f"no native kernels: {_dispatch.why_not('native', device)}")
        lines.append(f"backend 'auto' picks: {device.type} -> {picked} ({why})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedtrain", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, built backends, CPU instruction set, CUDA and Triton")
    compare_parser = commands.add_parser(
        "compare", help="time the built-in workloads on this machine, stock PyTorch against fusedtrain",
        description=compare.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_arguments(compare_parser)
    args = parser.parse_args(argv)
    if args.command == "compare":
        return compare.command(args, compare_parser)
    print("\n".join(info_lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
