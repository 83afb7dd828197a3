"""Which precision the network predicts in on a CPU.

On a CUDA GPU prediction runs under fp16 autocast, as nnU-Net's does. On a CPU nnU-Net stays in float32.
CPUs with native bfloat16 instructions (AVX512-BF16, AMX) run the U-Net's convolutions in bf16 about twice
as fast (measured: a 6-stage 3D U-Net on one 128^3 tile, 5.9 s in float32 against 3.1 s under bf16
autocast, 2 cores of a Xeon with avx512_bf16); elsewhere bf16 is emulated and slower, so it is used only
where the instructions exist. Measured on the example dataset's chosen ensemble (6 test cases, mirroring):
42.5 s in float32, 26.0 s in bf16, 83 of 2.77 M voxels labelled differently and the same foreground Dice
to the third decimal (0.8146 / 0.8147). ``--fp32`` on ``autoseg predict`` switches it off.
"""

from __future__ import annotations

import functools
from pathlib import Path

# /proc/cpuinfo flags of the instructions that make bf16 convolutions fast (oneDNN uses them).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU executes bfloat16 arithmetic natively (read from /proc/cpuinfo; False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)
