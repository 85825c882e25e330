"""Instructions per loop of the compiled CUDA kernels, read from their SASS (no GPU needed).

    python scripts/sass_loops.py FILE [KERNEL_SUBSTRING ...] [--all] [--body ADDR]

FILE: a CUDA object file or the built library (fasteval/_C*.so) holding sm_XX SASS. For each kernel whose
mangled name contains one of the substrings (every kernel without one), prints each loop (a backward branch
and the instructions it jumps over) with its instruction count and its global loads (how many of them
16-byte), MUFU (exp2) and FMNMX instructions. Without --all only the loops with a 16-byte load are printed:
the vector bodies of the row kernels. --body ADDR also lists the instructions of the loop starting at ADDR
(hex) with a count per opcode.

The count is static: a rarely taken branch inside a loop counts although it rarely runs. It is how the
cross-entropy kernels' hot loops were compared without a GPU (see the commit log); the device decides the
time. Needs cuobjdump: $CUDA_HOME/bin, PATH, or the copy bundled with triton.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys


def find_cuobjdump() -> str:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "cuobjdump"), shutil.which("cuobjdump") or ""]
    try:
        import triton  # noqa: F401  (bundles the NVIDIA binary tools)

        root = os.path.dirname(sys.modules["triton"].__file__)
        candidates += glob.glob(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("sass_loops: cuobjdump not found (set CUDA_HOME, or install triton)")


def kernels(sass: str):
    """(mangled name, [(address, instruction)]) for each function in cuobjdump -sass output."""
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        ins = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", part)]
        yield name, ins


def opcode(instr: str) -> str:
    words = instr.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


def loops(ins):
    """(start, end, body) for each backward branch."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    for i, (a, s) in enumerate(ins):
        m = re.search(r"\bBRA\b(?:\.\w+)*\s+(?:\w+,\s*)?0x([0-9a-f]+)", s)
        if m:
            target = int(m.group(1), 16)
            if target <= a and target in index:
                yield target, a, [x for _, x in ins[index[target]:i + 1]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("kernels", nargs="*")
    ap.add_argument("--all", action="store_true", help="every loop, not only those with a 16-byte load")
    ap.add_argument("--body", help="list the instructions of the loop starting at this hex address")
    args = ap.parse_args(argv)
    out = subprocess.run([find_cuobjdump(), "-sass", args.file], capture_output=True, text=True, check=True).stdout
    body_at = int(args.body, 16) if args.body else None
    found = False
    for name, ins in kernels(out):
        if args.kernels and not any(k in name for k in args.kernels):
            continue
        found = True
        print(name)
        for start, end, body in loops(ins):
            ldg = [x for x in body if opcode(x).startswith("LDG")]
            wide = sum(".128" in opcode(x) for x in ldg)
            if not args.all and not wide:
                continue
            mufu = sum(opcode(x).startswith("MUFU") for x in body)
            mnmx = sum(opcode(x).startswith("FMNMX") for x in body)
            print(f"  loop {start:#06x}-{end:#06x}: {len(body):4d} instructions, {len(ldg)} loads "
                  f"({wide} of 16 bytes), {mufu} MUFU, {mnmx} FMNMX")
            if start == body_at:
                counts = collections.Counter(opcode(x) for x in body)
                print("    " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
                for x in body:
                    print("      " + x)
    if not found:
        print("sass_loops: no kernel matched", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
