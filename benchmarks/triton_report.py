#!/usr/bin/env python
"""Offline compile report of the Triton kernels for sm_90 (H100/H200), without a GPU.

For each canonical workload (cifar, large-batch, many-classes, sharp; open-set through the
partial-OT module, see below) and each op the dispatcher serves (the solve and the fused KD
forward), in float32 and float64, this compiles every kernel configuration that
``selkd_kernels.ops.sinkhorn.triton.plan`` launches (Triton's own compiler, target
``GPUTarget("cuda", 90, 64)``, pointers 16-byte aligned as the JIT specialises them) and reads:

* registers and spill bytes (``ptxas -v``, the same ptxas and flags Triton uses), shared memory;
* the SASS (``cuobjdump -sass``): the hot loop of each kernel (the loop around its tensor-core
  products, its multiply-adds or its exponentials), counted per padded cost entry and
  half-iteration (``instructions_per_entry``, thread-instructions) and by instruction class;
* an estimate of the time per call on an H100/H200 from those counts
  (:mod:`selkd_kernels.ops.sinkhorn.triton_model`), next to the eager reference's estimate and
  the TF32 / FP32 / MUFU rooflines of the workload.

No shape has been measured on a GPU by this script: every time in its output is a model.

Usage::

    python benchmarks/triton_report.py --json benchmarks/results/triton_sm90.json \
        --text benchmarks/results/triton_sm90.txt
    python benchmarks/triton_report.py --check     # CI: exit 1 on spills in the canonical
                                                   # float32 configurations

The JSON is a list with one record per (workload, op, dtype, compiled configuration) with the
keys ``kernel``, ``workload``, ``dtype``, ``registers``, ``spill_store_bytes``,
``spill_load_bytes``, ``shared_bytes``, ``instructions_per_entry``, ``instruction_mix``,
``tensor_core``, ``estimated_us`` (and ``op``, ``config``, ``active``, ``launches``, ...).

Open-set: ``selkd_kernels.ops.partial_ot.triton.compile_targets(m, k, dtype)`` lists the partial-OT
kernel configurations a call on an ``(m, k)`` problem launches, as ``(name, jit_function,
signature, constexprs, num_warps)`` tuples; those are compiled for the open-set workload
(registers, spills, shared memory, instruction mix; no per-entry count or time estimate, which
the model only has for the Sinkhorn kernels). Where the module does not provide it, the open-set
rows are skipped and the reason is printed. ``--check`` covers the open-set float32 rows too.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would skip ptxas and its log
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from selkd_kernels.benchmarking.workloads import WORKLOADS, make_ot_inputs  # noqa: E402
from selkd_kernels.ops.sinkhorn import reference as ref  # noqa: E402
from selkd_kernels.ops.sinkhorn import triton as T  # noqa: E402
from selkd_kernels.ops.sinkhorn import triton_model as TM  # noqa: E402

OT_WORKLOADS = ("cifar", "large-batch", "many-classes", "sharp")
TARGET = GPUTarget("cuda", 90, 64)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_TY = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16",
       torch.bfloat16: "bf16"}
TC_OPS = ("HMMA", "HGMMA", "DMMA")
# instruction classes of instruction_mix
CLASSES = {
    "tensor_core": TC_OPS, "ffma": ("FFMA", "DFMA"), "fadd_fmul": ("FADD", "FMUL", "DADD", "DMUL"),
    "mufu": ("MUFU",), "shfl": ("SHFL",), "fcmp_fsel": ("FSETP", "FSEL", "FMNMX", "DSETP"),
    "load_global": ("LDG", "LDGSTS"), "store_global": ("STG",), "shared": ("LDS", "STS", "LDSM",
                                                                         "STSM"),
    "spill": ("LDL", "STL"), "barrier": ("BAR",),
}


# ----------------------------------------------------------------------------- compiling

def signature(fn, consts: dict, cd: torch.dtype, in_dtype: torch.dtype) -> dict:
    """Triton signature of a kernel as the backend launches it (see triton.py's pointer roles)."""
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in T.INT_POINTERS:
                sig[name] = "*i32"
            elif name in T.INPUT_POINTERS:
                sig[name] = "*" + _TY[in_dtype]
            else:
                sig[name] = "*" + _TY[cd]
        elif fn.params[i].annotation_type:
            sig[name] = fn.params[i].annotation_type
        else:
            sig[name] = "i32"
    return sig


def compile_config(fn, sig: dict, consts: dict, num_warps: int, num_stages: int = 1) -> dict:
    """Compile for sm_90; returns registers, spills, shared bytes, SASS text and compile time."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*")}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=TARGET,
                                options=dict(num_warps=num_warps, num_stages=num_stages))
    seconds = time.perf_counter() - t0
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], check=True,
                              capture_output=True, text=True).stdout
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spills.group(1)) if spills else None,
                spill_load_bytes=int(spills.group(2)) if spills else None,
                shared_bytes=int(kernel.metadata.shared), sass=sass, ttir=kernel.asm["ttir"],
                compile_s=round(seconds, 1))


# ----------------------------------------------------------------------------- SASS analysis

_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)"
                        r"([.A-Z0-9_]*)\s*([^;]*);")


def parse_sass(text: str) -> list[tuple[int, str, str, str]]:
    """(address, opcode, modifiers, operands) of every SASS instruction."""
    out = []
    for line in text.splitlines():
        mm = _SASS_LINE.match(line)
        if mm:
            out.append((int(mm.group(1), 16), mm.group(2), mm.group(3), mm.group(4)))
    return out


def find_loops(ins) -> list[tuple[int, int]]:
    """(first, last) address of every loop, from its backward branch."""
    loops = []
    for addr, op, _, rest in ins:
        if op == "BRA":
            target = re.search(r"0x([0-9a-f]+)", rest)
            if target and int(target.group(1), 16) < addr:
                loops.append((int(target.group(1), 16), addr))
    return loops


def _body(ins, loop):
    return [i for i in ins if loop[0] <= i[0] <= loop[1]]


def _innermost(loops):
    return [lp for lp in loops
            if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]


def _nested(ins, loop):
    """The innermost loops inside ``loop``, in address order."""
    return sorted(_innermost([lp for lp in find_loops(ins) if lp != loop and loop[0] <= lp[0]
                              and lp[1] <= loop[1]]))


def _count(ins, opcodes) -> int:
    return sum(1 for i in ins if i[1] in opcodes)


def hot_loops(kind: str, ins) -> list[tuple[int, int]]:
    """The loops that carry a kernel's work per cost entry: the innermost loop around its
    tensor-core products (``mma``) or the loop around those (``mma-outer``: one iteration of
    the solve, whose products are loops over the contraction), the innermost loop with the most
    multiply-adds (``fma``), or the two largest innermost loops with exponentials inside the
    iteration loop (``mufu``)."""
    loops = find_loops(ins)
    if not loops:
        return []
    if kind in ("mma", "mma-outer"):
        cand = [lp for lp in loops if _count(_body(ins, lp), TC_OPS)]
        inner = _innermost(cand)
        if kind == "mma" or not inner:
            return inner[:1]
        parents = [lp for lp in cand if lp not in inner and lp[0] <= inner[0][0]
                   and inner[0][1] <= lp[1]]
        return [min(parents, key=lambda lp: lp[1] - lp[0])] if parents else inner[:1]
    if kind == "fma":
        inner = _innermost(loops)
        fma = ("FFMA", "FMUL", "DFMA", "DMUL")
        return [max(inner, key=lambda lp: _count(_body(ins, lp), fma))]
    outer = max(loops, key=lambda lp: lp[1] - lp[0])
    inner = [lp for lp in _innermost(loops) if outer[0] <= lp[0] and lp[1] <= outer[1]
             and _count(_body(ins, lp), ("MUFU",))]
    return sorted(inner, key=lambda lp: lp[1] - lp[0], reverse=True)[:2]


def weighted_body(ins, loop, inner_trips) -> Counter:
    """Opcode counts of one trip of ``loop``, the loops nested in it counted ``inner_trips``
    times each (in address order)."""
    nested = _nested(ins, loop)
    if inner_trips and len(nested) != len(inner_trips):
        raise RuntimeError(f"expected {len(inner_trips)} loops nested in the hot loop, found "
                           f"{len(nested)}: the kernel's structure changed, update HOT")
    out = Counter()
    for addr, op, _, _ in _body(ins, loop):
        weight = 1
        for lp, trips in zip(nested, inner_trips or ()):
            if lp[0] <= addr <= lp[1]:
                weight = trips
        out[op] += weight
    return out


def _ldg_bytes(body) -> int:
    total = 0
    for _, op, mods, _ in body:
        if op in ("LDG", "LDGSTS"):
            width = 16 if ".128" in mods else 8 if ".64" in mods else 4
            total += width * 32
    return total


def _ldg_bytes_weighted(per_trip, bodies) -> float:
    """Bytes one warp loads per trip: the static loads' average width times their weighted
    count."""
    loads = [i for body in bodies for i in body if i[1] in ("LDG", "LDGSTS")]
    if not loads:
        return 0.0
    width = _ldg_bytes(loads) / len(loads)
    return width * (per_trip.get("LDG", 0) + per_trip.get("LDGSTS", 0))


def _resident_l2_bytes(c, elem):
    # per iteration and program: each half-iteration reads its operand rows and marginals and
    # writes denominators and scalings (BB rows); K itself (2 x BM x BN x 4 bytes, head and
    # tail) stays in the SM's L1 between half-iterations (the model's assumption, docs/gpu.md)
    return 4 * c["BB"] * (c["BM"] + c["BN"]) * elem


# by kernel name: which loop is hot, cost entries per trip (triton_model), trips of the loops
# nested in it, and the L2 bytes one trip moves (None: the SASS loads' bytes)
HOT = {
    "scaling-resident": ("mma-outer", TM.ENTRIES_PER_TRIP["scaling-resident"],
                         lambda c: [c["BN"] // c["BK"], c["BM"] // c["BK"]], _resident_l2_bytes),
    "gemm-alpha": ("mma", TM.ENTRIES_PER_TRIP["gemm-alpha"], None, None),
    "gemm-beta": ("mma", TM.ENTRIES_PER_TRIP["gemm-beta"], None, None),
    "gemm-check": ("mma", TM.ENTRIES_PER_TRIP["gemm-check"], None, None),
    "gemm-finish-product": ("mma", TM.ENTRIES_PER_TRIP["gemm-finish-product"], None, None),
    "stabilized": ("fma", TM.ENTRIES_PER_TRIP["stabilized"], None, None),
    "log-streamed": ("mufu", TM.ENTRIES_PER_TRIP["log-streamed"], None, None),
}


def analyse(name: str, consts: dict, num_warps: int, sass: str, elem: int = 4) -> dict:
    """Hot-loop counts per trip (per warp), per-entry metrics and the instruction mix."""
    ins = parse_sass(sass)
    whole = Counter(i[1] for i in ins)
    res = dict(tensor_core=any(whole[op] for op in TC_OPS), static_instructions=len(ins))
    spec = HOT.get(name)
    loops = hot_loops(spec[0], ins) if spec else []
    if not loops:
        res.update(instructions_per_entry=None, hot_loop=None,
                   instruction_mix={k: sum(whole[o] for o in v) for k, v in CLASSES.items()},
                   per_trip=None, rest=_pipes(ins), ldg_bytes_per_trip=0)
        return res
    bodies = [_body(ins, lp) for lp in loops]
    inner_trips = spec[2](consts) if spec[2] else None
    per_trip = Counter()
    units = 0.0
    for lp in loops:
        weighted = weighted_body(ins, lp, inner_trips)
        per_trip.update(weighted)
        units += _wgmma_units(ins, lp, inner_trips)
    for op in per_trip:
        per_trip[op] /= len(loops)
    units /= len(loops)
    entries = spec[1](consts)
    threads = 32 * num_warps
    norm = threads / entries
    in_hot = {i[0] for body in bodies for i in body}
    res.update(hot_loop=[f"{lo:#x}-{hi:#x}" for lo, hi in loops],
               hot_loop_instructions=sum(per_trip.values()),
               entries_per_trip=entries,
               instructions_per_entry=round(sum(per_trip.values()) * norm, 3),
               instruction_mix={k: round(sum(per_trip[o] for o in v) * norm, 4)
                                for k, v in CLASSES.items()},
               per_trip=_pipes_counter(per_trip, units),
               rest=_pipes([i for i in ins if i[0] not in in_hot]),
               ldg_bytes_per_trip=(spec[3](consts, elem) if spec[3] else
                                   _ldg_bytes_weighted(per_trip, bodies) * num_warps))
    return res


def _pipes_counter(counter, wgmma_units=None) -> dict:
    """Per-warp work by pipe: instruction counts, except that wgmma is counted in units of a
    64 x 8 x 8 product (its issue cost is one instruction, its tensor-core time scales with N);
    ``issue`` holds the instruction count."""
    out = Counter()
    for op, c in counter.items():
        out[TM.pipe_of(op)] += c
    if out.get("wgmma"):
        out["wgmma"] = wgmma_units
    out["issue"] = sum(counter.values())
    return dict(out)


def _pipes(ins) -> dict:
    c = Counter(i[1] for i in ins)
    return _pipes_counter(c, _wgmma_units(ins, None, None))


def _wgmma_units(ins, loop, inner_trips) -> float:
    """64 x 8 x 8 product units of the HGMMA instructions in ``loop`` (all code if None)."""
    body = ins if loop is None else _body(ins, loop)
    nested = _nested(ins, loop) if loop else []
    total = 0.0
    for addr, op, mods, _ in body:
        if op != "HGMMA":
            continue
        shape = re.match(r"\.64x(\d+)x", mods)
        weight = int(shape.group(1)) / 8 if shape else 1.0
        for lp, trips in zip(nested, inner_trips or ()):
            if lp[0] <= addr <= lp[1]:
                weight *= trips
        total += weight
    return total


# ----------------------------------------------------------------------------- estimates

def cost_record(info, num_warps) -> dict:
    """What triton_model needs of a compiled configuration: work per trip and entry for the
    whole program, work outside the hot loop, registers, shared memory, L2 bytes per entry."""
    out = dict(registers=info["registers"], shared=info["shared_bytes"],
               rest={k: round(v * num_warps, 3) for k, v in info["rest"].items()})
    if info.get("per_trip"):
        e = info["entries_per_trip"]
        out["trip"] = {k: round(v * num_warps / e, 6) for k, v in info["per_trip"].items()}
        out["l2_per_entry"] = round(info["ldg_bytes_per_trip"] / e, 6)
    return out


def rooflines(w) -> dict:
    useful = 2.0 * 2.0 * w.B * w.m * w.n * w.n_iters  # two products, 2 flops per multiply-add
    exps = 2.0 * w.B * w.m * w.n * w.n_iters
    return dict(tf32_us=1e6 * useful / TM.TF32_FLOPS, fp32_us=1e6 * useful / TM.FP32_FLOPS,
                mufu_us=1e6 * exps / TM.MUFU_PER_S)


# ----------------------------------------------------------------------------- the report

def _domain_of(w) -> str:
    inp = make_ot_inputs(w, "cpu", torch.float32)
    return ref.choose_method(inp.cost, w.eps, torch.float32)


def ot_records(workloads, dtypes, ops, cache, progress) -> tuple[list, list]:
    records, summary = [], []
    for wname in workloads:
        w = WORKLOADS[wname]
        domain = _domain_of(w)
        for dt in dtypes:
            for op in ops:
                p = T.Problem(B=w.B, m=w.m, n=w.n, dtype=dt, shared=True, kd=op == "kd",
                              teacher_grad=False, has_tol=False, method="auto")
                total = 0.0
                for step in T.plan(p):
                    cfg = step.config
                    key = (cfg.name, cfg.constexprs, cfg.num_warps, dt)
                    if key not in cache:
                        progress(f"compile {cfg.name} {_TY[dt]} {cfg.consts}")
                        sig = signature(cfg.fn, cfg.consts, dt, dt)
                        info = compile_config(cfg.fn, sig, cfg.consts, cfg.num_warps,
                                              cfg.num_stages)
                        info.update(analyse(cfg.name, cfg.consts, cfg.num_warps, info["sass"],
                                            8 if dt == torch.float64 else 4))
                        cache[key] = info
                    info = cache[key]
                    active = step.domain in ("any", domain)
                    cost = cost_record(info, cfg.num_warps)
                    us = TM.step_estimate_us(step, cost, n_iters=w.n_iters, n_checks=0, m=w.m,
                                             n=w.n, rows=T._rows_per_program(p), active=active)
                    total += us
                    launches = TM.launches_of(step, w.n_iters, 0)
                    records.append(_record(cfg, step, info, dict(estimated_us=round(us, 2),
                                                                 launches=launches),
                                           wname, op, dt, active, cost))
                roof = rooflines(w)
                refe = TM.reference_estimate_us(w.B, w.m, w.n, w.n_iters, domain == "log",
                                                8 if dt == torch.float64 else 4, op == "kd")
                summary.append(dict(workload=wname, op=op, dtype=str(dt).replace("torch.", ""),
                                    domain=domain, estimated_us=round(total, 1),
                                    reference_eager_us=round(refe, 1),
                                    speedup_vs_eager=round(refe / total, 2), **{
                                        k: round(v, 2) for k, v in roof.items()}))
    return records, summary


def _record(cfg, step, info, est, wname, op, dt, active, cost) -> dict:
    return dict(kernel=cfg.name, workload=wname, op=op, dtype=str(dt).replace("torch.", ""),
                registers=info["registers"], spill_store_bytes=info["spill_store_bytes"],
                spill_load_bytes=info["spill_load_bytes"], shared_bytes=info["shared_bytes"],
                instructions_per_entry=info["instructions_per_entry"],
                instruction_mix=info["instruction_mix"], tensor_core=info["tensor_core"],
                estimated_us=est["estimated_us"], active=active, launches=est["launches"],
                grid=list(step.grid), num_warps=cfg.num_warps,
                config={k: v for k, v in cfg.consts.items()}, hot_loop=info.get("hot_loop"),
                cycles_per_entry=_cpe(cost), compile_s=info["compile_s"],
                precision=cfg.consts.get("PRECISION"), cost=cost)


def _cpe(cost):
    """SM cycles per padded cost entry and half-iteration of the hot loop at full issue rate."""
    if not cost.get("trip"):
        return None
    return round(TM.pipe_cycles(cost["trip"]), 6)


def open_set_records(dtypes, progress) -> tuple[list, str | None]:
    try:
        from selkd_kernels.ops.partial_ot import triton as PT
    except Exception as exc:  # the module may be mid-rewrite
        return [], f"selkd_kernels.ops.partial_ot.triton does not import: {exc}"
    fn = getattr(PT, "compile_targets", None)
    if fn is None:
        return [], ("selkd_kernels.ops.partial_ot.triton defines no compile_targets(m, k, dtype); "
                    "open-set rows skipped")
    w = WORKLOADS["open-set"]
    records = []
    for dt in dtypes:
        for name, jit_fn, sig, consts, nw in fn(w.m, w.n, dt):
            progress(f"compile open-set {name} {_TY[dt]}")
            info = compile_config(jit_fn, sig, consts, nw)
            info.update(analyse(name, consts, nw, info["sass"]))
            records.append(dict(kernel=name, workload="open-set", op="partial-ot",
                                dtype=str(dt).replace("torch.", ""),
                                registers=info["registers"],
                                spill_store_bytes=info["spill_store_bytes"],
                                spill_load_bytes=info["spill_load_bytes"],
                                shared_bytes=info["shared_bytes"],
                                instructions_per_entry=None,
                                instruction_mix=info["instruction_mix"],
                                tensor_core=info["tensor_core"], estimated_us=None, active=True,
                                launches=1, num_warps=nw, config=dict(consts),
                                compile_s=info["compile_s"]))
    return records, None


def _or_dash(fmt):
    return lambda v: "-" if v is None else format(v, fmt)


# (header, width, cell) per column; ">" right-aligns; a cell maps the record to its text
_KERNEL_COLUMNS = (
    ("workload", 13, lambda r: r["workload"]), ("op", 10, lambda r: r["op"]),
    ("dtype", 7, lambda r: r["dtype"]), ("kernel", 21, lambda r: r["kernel"]),
    ("act", 3, lambda r: "yes" if r["active"] else "no"),
    ("warps", -5, lambda r: str(r["num_warps"])), ("regs", -4, lambda r: str(r["registers"] or 0)),
    ("spill st/ld", -11, lambda r: f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"),
    ("smem", -6, lambda r: str(r["shared_bytes"])),
    ("TC", 2, lambda r: "y" if r["tensor_core"] else "-"),
    ("instr/entry", -11, lambda r: _or_dash(".2f")(r["instructions_per_entry"])),
    ("est. us", -9, lambda r: _or_dash(".1f")(r["estimated_us"])))
_CALL_COLUMNS = (
    ("workload", 13, lambda s: s["workload"]), ("op", 5, lambda s: s["op"]),
    ("dtype", 7, lambda s: s["dtype"]), ("domain", 8, lambda s: s["domain"]),
    ("triton est. us", -14, lambda s: f"{s['estimated_us']:.1f}"),
    ("eager ref. us", -13, lambda s: f"{s['reference_eager_us']:.1f}"),
    ("ratio", -6, lambda s: f"{s['speedup_vs_eager']:.2f}"),
    ("TF32 roof", -9, lambda s: f"{s['tf32_us']:.2f}"),
    ("FP32 roof", -9, lambda s: f"{s['fp32_us']:.2f}"),
    ("MUFU roof", -9, lambda s: f"{s['mufu_us']:.2f}"))


def _table(columns, rows) -> list:
    """Fixed-width lines: a header, a rule, one line per row (negative width: right-aligned)."""
    def line(cells):
        return " ".join(c.rjust(-w) if w < 0 else c.ljust(w) for c, (_, w, _) in
                        zip(cells, columns))
    head = line([h for h, _, _ in columns])
    return [head, "-" * len(head)] + [line([cell(r) for _, _, cell in columns]) for r in rows]


def text_table(records, summary, skipped) -> str:
    lines = [("Triton kernels compiled offline for sm_90 (no GPU; every time is a model, "
              "see benchmarks/triton_report.py)"), ""]
    lines += _table(_KERNEL_COLUMNS, records)
    lines += ["", ("Per call (active kernels of the domain the reference's method='auto' picks; "
                   "every launch at least 4 us of host time):"), ""]
    lines += _table(_CALL_COLUMNS, summary)
    if skipped:
        lines += ["", f"open-set: {skipped}"]
    return "\n".join(lines) + "\n"


def check(records) -> list[str]:
    """Failures of the static targets CI enforces: no spills in canonical float32 configs
    (open-set included), and triton_model.COSTS within 25 % of what the compiled kernels give
    (the dispatcher's estimates come from it)."""
    bad = [f"{r['workload']} {r['op']} {r['kernel']}: spills {r['spill_store_bytes']}/"
           f"{r['spill_load_bytes']} bytes" for r in records
           if r["dtype"] == "float32" and r["workload"] in OT_WORKLOADS + ("open-set",)
           and (r["spill_store_bytes"] or r["spill_load_bytes"])]
    for key, cost in costs_table(records).items():
        want = TM.COSTS.get(key)
        if want is None:
            bad.append(f"triton_model.COSTS has no entry {key}; run --costs")
            continue
        got_c, want_c = TM.pipe_cycles(cost.get("trip", {})), TM.pipe_cycles(want.get("trip", {}))
        if not (0.75 * want_c <= got_c <= 1.25 * want_c):
            bad.append(f"triton_model.COSTS[{key}]: {want_c:.4g} cycles per entry recorded, the "
                       f"kernel compiles to {got_c:.4g}; run --costs")
    return sorted(set(bad))


def costs_table(records) -> dict:
    """One cost record per (kernel, dtype) with a hot loop, from the canonical workloads (the
    first configuration met: cifar's, then many-classes')."""
    out = {}
    for r in records:
        key = (r["kernel"], r["dtype"])
        if r["workload"] in OT_WORKLOADS and r["kernel"] in TM.ENTRIES_PER_TRIP and key not in out:
            out[key] = r["cost"]
    return out


def costs_literal(records) -> str:
    """triton_model.COSTS as Python source: the hot-loop work per entry with 4 significant
    digits, the work outside it rounded to whole instructions."""
    def wrap(prefix, d):
        lines, line = [], " " * 8 + prefix + "{"
        for item in (f"{k!r}: {v!r}" for k, v in d.items()):
            if len(line) + len(item) + 2 > 98:
                lines.append(line.rstrip())
                line = " " * 12
            line += item + ", "
        lines.append(line[:-2] + "},")
        return "\n".join(lines)

    lines = ["COSTS = {"]
    for key, cost in sorted(costs_table(records).items()):
        lines.append(f"    {key!r}: dict(")
        head = f"        registers={cost['registers']}, shared={cost['shared']},"
        if "trip" in cost:
            l2 = float(f"{cost['l2_per_entry']:.4g}")
            head += f" l2_per_entry={l2!r},"
        lines.append(head)
        lines.append(wrap("rest=", {k: round(v) for k, v in sorted(cost["rest"].items())}))
        if "trip" in cost:
            lines.append(wrap("trip=", {k: float(f"{v:.4g}")
                                        for k, v in sorted(cost["trip"].items())}))
        lines[-1] = lines[-1][:-1] + "),"
    return "\n".join(lines) + "\n}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the records (JSON list) here")
    ap.add_argument("--text", help="write the human-readable table here (also printed)")
    ap.add_argument("--check", action="store_true",
                    help="float32 only; exit 1 on spills in canonical configurations or a stale "
                         "triton_model.COSTS")
    ap.add_argument("--costs", action="store_true",
                    help="print triton_model.COSTS as Python (to paste after a kernel change)")
    ap.add_argument("--workloads", nargs="+", default=list(OT_WORKLOADS) + ["open-set"])
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    dtypes = [torch.float32] if args.check else [torch.float32, torch.float64]
    progress = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    t0 = time.perf_counter()
    cache = {}
    ot = [w for w in args.workloads if w in OT_WORKLOADS]
    records, summary = ot_records(ot, dtypes, ("solve", "kd"), cache, progress)
    skipped, extra = None, []
    if "open-set" in args.workloads:
        extra, skipped = open_set_records(dtypes, progress)
        records += extra
    table = text_table(records, summary, skipped)
    print(table)
    if args.costs:
        print(costs_literal(records))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
            fh.write("\n")
        with open(os.path.splitext(args.json)[0] + "_summary.json", "w") as fh:
            json.dump(summary, fh, indent=1)
            fh.write("\n")
    if args.text:
        with open(args.text, "w") as fh:
            fh.write(table)
    print(f"{len(cache) + len(extra)} configurations compiled in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    if args.check:
        failures = check(records)
        for f in failures:
            print(f"CHECK FAILED: {f}", file=sys.stderr)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
