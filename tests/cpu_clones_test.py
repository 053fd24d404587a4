#!/usr/bin/env python3
"""Checks that the AVX2 clones of Aviary's fused CPU loops are vectorised.

The loops in src/ops/cpu_loops.cpp and cpu_attention.cpp are compiled three times (GCC
target_clones: x86-64-v4 = AVX-512, x86-64-v3 = AVX2 + FMA, and the baseline), and rely on GCC
vectorising plain C++. A loop that GCC vectorises for AVX-512 but not for AVX2 compiles and passes
every value test, yet runs several times slower on every CPU without AVX-512 (most AMD EPYCs and
desktop CPUs): that happened once (exp_poly's selects under -ftrapping-math; max_body's 16-float
vector), and went unseen because the development machine had AVX-512.

So this test disassembles the library and, for every function of aviary::ops::cpu with both clones,
counts packed and scalar floating-point arithmetic instructions. Wherever the AVX-512 clone has
packed ones, the AVX2 clone must have at least half as many (it usually has more: a 16-wide body
becomes two 8-wide halves). Scalar code in the baseline clone is not checked.

usage: cpu_clones_test.py LIBRARY [OBJDUMP]
"""
import collections
import re
import subprocess
import sys

# At least this many functions must have both clones with a vectorised AVX-512 one, or the test
# checks nothing: the names changed under it, or the build is not optimised (CMake registers the
# test only for optimised builds).
MIN_CHECKED = 10
NAMESPACE = "aviary::ops::cpu::"

ARITH = re.compile(
    r"\s(v?(?:add|sub|mul|div|max|min|sqrt|f[n]?m(?:add|sub)\d*|cmp\w*?|blendv)(ps|ss|pd|sd))\s")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
CLONE = re.compile(r"^(.*) \[clone \.(arch_x86_64_v[34])\]$")


def count_clones(library, objdump):
    listing = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", library],
                             capture_output=True, text=True, check=True).stdout
    counts = collections.defaultdict(lambda: {"packed": 0, "scalar": 0})
    current = None
    for line in listing.splitlines():
        header = FUNCTION.match(line)
        if header:
            clone = CLONE.match(header.group(1))
            current = None
            if clone and clone.group(1).startswith(NAMESPACE):
                current = (clone.group(1), clone.group(2))
            continue
        if current is None:
            continue
        op = ARITH.search(line)
        if op:
            counts[current]["packed" if op.group(2) in ("ps", "pd") else "scalar"] += 1
    return counts


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    library = sys.argv[1]
    objdump = sys.argv[2] if len(sys.argv) == 3 else "objdump"
    counts = count_clones(library, objdump)
    names = sorted({name for name, _ in counts})
    pairs = [n for n in names if (n, "arch_x86_64_v3") in counts and (n, "arch_x86_64_v4") in counts]
    failures = []
    checked_pairs = 0
    for name in pairs:
        avx2, avx512 = counts[(name, "arch_x86_64_v3")], counts[(name, "arch_x86_64_v4")]
        checked = avx512["packed"] > 0
        ok = not checked or 2 * avx2["packed"] >= avx512["packed"]
        short = name[len(NAMESPACE):]
        print(f"{'ok  ' if ok else 'FAIL'} AVX2 {avx2['packed']:4d} packed {avx2['scalar']:4d} scalar"
              f" | AVX-512 {avx512['packed']:4d} packed {avx512['scalar']:4d} scalar"
              f"{'' if checked else ' (not checked)'} | {short}")
        checked_pairs += checked
        if not ok:
            failures.append(short)
    if checked_pairs < MIN_CHECKED:
        sys.exit(f"{library}: only {checked_pairs} functions of {NAMESPACE} have an x86-64-v3 clone "
                 f"and a vectorised x86-64-v4 one (expected {MIN_CHECKED} or more): is the build "
                 "optimised, and have AVIARY_CPU_CLONES (src/ops/cpu_simd.h) or GCC's clone naming "
                 "changed?")
    if failures:
        sys.exit(f"{len(failures)} AVX2 clone(s) in {library} are not vectorised as their AVX-512 "
                 f"clone is: {', '.join(failures)}. Compile the file with -fopt-info-vec-missed "
                 "-march=x86-64-v3 to see why (CMakeLists.txt gives src/ops/cpu_loops.cpp and "
                 "cpu_attention.cpp -fno-trapping-math for this reason).")
    print(f"{checked_pairs} functions checked: every AVX2 clone is vectorised")


if __name__ == "__main__":
    main()
