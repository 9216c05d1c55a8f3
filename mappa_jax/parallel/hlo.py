"""Collectives in a compiled XLA program, and which of them run inside a loop.

A collective inside a `while` body runs at every iteration: in the sampler's decode loop that is
every generated token, so an all-gather of a weight there moves the whole model over the
interconnect per token. `collectives(compiled.as_text())` lists every collective of an optimized
HLO module with its result size and whether it sits in a loop's body or condition (directly, or in a fusion,
branch or nested loop that the body calls).
"""
from __future__ import annotations

import dataclasses
import math
import re

# Opcodes of cross-device communication (async pairs are counted once, at their -start).
COLLECTIVE_OPCODES = ("all-gather", "all-gather-start", "all-reduce", "all-reduce-start", "reduce-scatter",
                      "all-to-all", "ragged-all-to-all", "collective-permute", "collective-permute-start",
                      "collective-broadcast")
_ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s(" + "|".join(
    re.escape(op) for op in sorted(COLLECTIVE_OPCODES, key=len, reverse=True)) + r")\(")
_CALLED = re.compile(r"\b(?:condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE_PARTS = re.compile(r"\b(?:condition|body)=%?([\w.\-]+)")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    opcode: str          # e.g. "all-gather", "all-reduce-start"
    name: str            # the HLO instruction name
    shape: str           # its result shape, as HLO writes it
    bytes: int           # result bytes on one device (an async start: its outputs)
    computation: str     # the HLO computation holding it
    in_loop: bool        # inside a while body or condition (run once per iteration)
    op_name: str = ""    # the JAX source op (metadata), e.g. "jit(decode)/while/body/..."


def _array_bytes(text: str) -> int:
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _ELEMENT_BYTES:
            total += _ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _result_bytes(opcode: str, shape: str) -> int:
    arrays = _ARRAY.findall(shape)
    if opcode.endswith("-start") and shape.startswith("(") and len(arrays) > 1:
        # An async start returns (operands..., outputs...[, context]): count the outputs.
        if opcode == "collective-permute-start":
            arrays = arrays[1:2]
        else:
            arrays = arrays[len(arrays) // 2:]
        return _array_bytes(" ".join(f"{d}[{s}]" for d, s in arrays))
    return _array_bytes(shape)


def _computations(hlo_text: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t", "}")) and (m := _HEADER.match(line)):
            current = m.group(1)
            comps[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps


def _callees(lines: list[str]) -> set[str]:
    called = set()
    for line in lines:
        called.update(_CALLED.findall(line))
        for group in _CALLED_LISTS.findall(line):
            called.update(name.strip().lstrip("%") for name in group.split(",") if name.strip())
    return called


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an optimized HLO module (`jax.jit(f).lower(...).compile().as_text()`)."""
    comps = _computations(hlo_text)
    calls = {name: _callees(lines) for name, lines in comps.items()}
    in_loop: set[str] = set()
    pending = [part for lines in comps.values() for line in lines if " while(" in line
               for part in _WHILE_PARTS.findall(line)]
    while pending:  # everything a loop's body or condition reaches runs per iteration
        name = pending.pop()
        if name in in_loop or name not in comps:
            continue
        in_loop.add(name)
        pending.extend(calls[name])
    found = []
    for comp, lines in comps.items():
        for line in lines:
            if m := _INSTRUCTION.match(line):
                name, shape, opcode = m.groups()
                op = _OP_NAME.search(line)
                found.append(Collective(opcode, name, shape.strip(), _result_bytes(opcode, shape), comp,
                                        comp in in_loop, op.group(1) if op else ""))
    return found


def loop_collectives(hlo_text: str, min_bytes: int = 0) -> list[Collective]:
    """The collectives that run at every iteration of some loop, of at least `min_bytes`."""
    return [c for c in collectives(hlo_text) if c.in_loop and c.bytes >= min_bytes]
