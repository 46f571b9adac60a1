#!/usr/bin/env python3
"""Finds registers of an asynchronous `wgmma` rewritten before its wait, in compiled Hopper kernels.

A `wgmma.mma_async` reads its A fragment from registers (the register-sourced form) and writes its
accumulators after it has been issued; the PTX ISA leaves any access to those registers undefined
until a `wgmma.wait_group` covering it. The C++ pins (`wgmma_pin`) emit no instruction, so ptxas does
not see them, and it may give the A registers to the next step's `ldmatrix` or to address
arithmetic while the tensor cores still read them: the results then depend on timing. This script
walks each kernel's SASS from every `*GMMA` along every path (branches and loop back-edges
followed) to the next `WARPGROUP.DEPBAR.LE gsb0, 0x0` and reports each instruction on the way that
writes one of that `wgmma`'s registers. It reads the destination register of ordinary instructions
only (a heuristic: an instruction whose destination it cannot parse is not checked).

    python scripts/wgmma_hazards.py                  # builds cuda/*_sm90a.cu (DSV4RS_NVCC or nvcc), checks them
    python scripts/wgmma_hazards.py a.cubin b.fatbin # checks these (scripts/test.sh: the build's sm_90a fatbins)
    options: --cuobjdump PATH (default: $CUOBJDUMP, then cuobjdump on PATH)

Exits 1 when it finds a hazard, 0 when none; prints each kernel that holds a `wgmma` and its count.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

INSTR = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
REG = re.compile(r"\bR(\d+)\b")


def parse(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Each function's instructions as (address, instruction text)."""
    funcs, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            funcs[name] = []
            continue
        m = INSTR.match(line)
        if m and name:
            funcs[name].append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def opcode(text: str) -> tuple[str, bool, str]:
    """(opcode, predicated, operands)."""
    parts = text.split(None, 1)
    pred = parts[0].startswith("@")
    if pred:
        parts = parts[1].split(None, 1)
    return parts[0], pred, parts[1] if len(parts) > 1 else ""


def gmma_registers(op: str, operands: str) -> set[int]:
    """The accumulator registers (N / 2 a thread for float32 sums, N / 4 for half) and, in the
    register-sourced form, the A fragment's four."""
    regs = REG.findall(operands)
    shape = re.search(r"64x(\d+)x", op)
    n = int(shape.group(1)) if shape else 8
    d = int(regs[0])
    out = set(range(d, d + (n // 2 if ".F32" in op else n // 4)))
    first = operands.split(",")
    if len(first) > 1 and REG.match(first[1].strip()):  # A from registers
        a = int(REG.match(first[1].strip()).group(1))
        out |= set(range(a, a + 4))
    return out


def written(op: str, operands: str) -> set[int]:
    """Registers an ordinary instruction writes (its first operand), by its width."""
    base = op.split(".")[0]
    if base in ("ST", "STS", "STG", "STL", "RED", "BAR", "LDGSTS", "BRA", "BRX", "BRXU", "EXIT", "RET", "CALL",
                "DEPBAR", "LDGDEPBAR", "MEMBAR", "FENCE", "WARPGROUP", "SYNCS", "UTMALDG", "UTMASTG", "NOP", "BSSY",
                "BSYNC", "WARPSYNC", "ERRBAR", "CCTL") or base.startswith("U") or "GMMA" in base:
        return set()
    m = REG.match(operands.split(",")[0].strip()) if operands else None
    if not m:
        return set()
    r = int(m.group(1))
    width = 1
    if base == "LDSM":
        width = 4 if op.endswith(".4") else (2 if op.endswith(".2") else 1)
    elif ".128" in op:
        width = 4
    elif ".64" in op or ".WIDE" in op or base in ("DADD", "DMUL", "DFMA", "DMNMX") or (
            base in ("F2F", "I2F") and op.split(".")[1:2] == ["F64"]):
        width = 2  # a 64-bit value: two registers
    return set(range(r, r + width))


def hazards(instrs: list[tuple[int, str]]) -> list[str]:
    at = {a: i for i, (a, _) in enumerate(instrs)}
    found = []
    for i, (addr, text) in enumerate(instrs):
        op, _, operands = opcode(text)
        if "GMMA" not in op:
            continue
        regs = gmma_registers(op, operands)
        seen, todo = set(), [i + 1]
        while todo:
            j = todo.pop()
            if j >= len(instrs) or j in seen:
                continue
            seen.add(j)
            a, t = instrs[j]
            o, pred, ops = opcode(t)
            if o.startswith("WARPGROUP.DEPBAR") and re.search(r"gsb0,\s*0x0\b", ops):
                continue  # waited for: this path is safe from here
            if "GMMA" not in o and written(o, ops) & regs:
                found.append(f"{hex(addr)} {op}: {hex(a)} {t}")
            if o in ("EXIT", "RET") and not pred:
                continue
            if o == "BRA":
                target = re.search(r"0x([0-9a-f]+)", ops)
                if target and int(target.group(1), 16) in at:
                    todo.append(at[int(target.group(1), 16)])
                if not pred:
                    continue
            if o in ("BRX", "BRXU"):  # a jump table: its targets follow it closely
                todo.extend(range(j + 1, min(j + 16, len(instrs))))
            todo.append(j + 1)
    return found


def build(nvcc: str, out: str) -> list[str]:
    cubins = []
    for src in sorted(glob.glob("cuda/*_sm90a.cu")):
        cubin = os.path.join(out, os.path.basename(src) + ".cubin")
        print(f"building {src}", file=sys.stderr)
        subprocess.run([nvcc, "-O3", "-std=c++17", "-Icuda/include", "-gencode", "arch=compute_90a,code=sm_90a",
                        "-cubin", "-o", cubin, src], check=True)
        cubins.append(cubin)
    return cubins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cubins", nargs="*")
    parser.add_argument("--cuobjdump", default=os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump"))
    args = parser.parse_args()
    if not args.cuobjdump:
        sys.exit("wgmma_hazards: no cuobjdump (pass --cuobjdump PATH or set CUOBJDUMP)")
    with tempfile.TemporaryDirectory() as tmp:
        cubins = args.cubins
        if not cubins:
            nvcc = os.environ.get("DSV4RS_NVCC") or shutil.which("nvcc")
            if not nvcc:
                sys.exit("wgmma_hazards: no nvcc to build the kernels with (set DSV4RS_NVCC)")
            cubins = build(nvcc, tmp)
        total = 0
        for cubin in cubins:
            sass = subprocess.run([args.cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
            for name, instrs in parse(sass).items():
                if not any("GMMA" in t for _, t in instrs):
                    continue
                found = hazards(instrs)
                total += len(found)
                print(f"{name}: {len(found)}")
                for f in found[:10]:
                    print(f"    wgmma at {f}")
    print(f"{total} hazards")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
