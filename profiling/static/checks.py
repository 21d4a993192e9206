"""What must hold of every kernel a GPU would run, judged on its inspection record (static_inspect.py):

- it compiles for the target;
- its shared memory fits the architecture's per-block limit, and at least one block fits an SM;
- it does not spill (STACK + LOCAL bytes beyond what its docstring tolerates, or STL/LDL in its SASS);
- a kernel whose point is tensor cores uses them: HMMA on sm_80, HGMMA on sm_90 for a Triton tile of 4+ warps
  whose MMA is at least 64 rows (wgmma's m64; smaller tiles get mma.sync, HMMA) and for a CUDA wgmma kernel,
  UTC*MMA or HMMA on sm_100;
- a pipelined GEMM or attention loop copies asynchronously (LDGSTS or TMA), and a kernel on tensor descriptors
  with bulk tensor copies (UTMALDG).
"""

from __future__ import annotations

from gpuforge.profiling.static.sass import ASYNC_COPY_FAMILIES, TENSOR_CORE_FAMILIES, WGMMA_FAMILIES


def _mma_rows(record: dict) -> int:
    """The M of the variant's tile (its BLOCK_M, else BLOCK_N for a key tile), 0 when not known."""
    tile = record.get("tile") or {}
    return min((v for k, v in tile.items() if k in ("BLOCK_M", "BLOCK_N")), default=0)


def problems(record: dict) -> list[str]:
    """The checks this record fails, in words (empty: it passes)."""
    if "error" in record:
        return [f"does not compile: {record['error']}"]
    out = []
    occ = record.get("occupancy", {})
    if occ.get("blocks", 0) == 0:
        out.append(f"zero occupancy ({occ.get('limit', 'unknown')})")
    spill = record["stack"] + record["local"]
    mix = record["mix"]
    if spill > record.get("tolerated_spill_bytes", 0) or ((mix["STL"] or mix["LDL"]) and
                                                          not record.get("tolerated_spill_bytes")):
        out.append(f"spills {spill} B per thread (STL {mix['STL']}, LDL {mix['LDL']})")
    if record.get("tensor_cores"):
        arch = record["arch"]
        wants_wgmma = record.get("wgmma") or (arch == "sm_90" and record["source"] == "triton"
                                              and (record.get("num_warps") or 0) >= 4 and _mma_rows(record) >= 64)
        if wants_wgmma and not any(mix.get(f, 0) for f in WGMMA_FAMILIES):
            out.append("no HGMMA/QGMMA (wgmma) on sm_90 for a wgmma kernel or a 4-warp tile of 64+ rows")
        elif not any(mix.get(f, 0) for f in TENSOR_CORE_FAMILIES):
            out.append("no tensor-core instructions")
    if record.get("tma") and not mix["UTMALDG"]:
        out.append(f"no bulk tensor copies (UTMALDG) on {record['arch']} in a tensor-descriptor kernel")
    if record.get("async_copies") and not any(mix[f] for f in ASYNC_COPY_FAMILIES):
        out.append("no asynchronous copies (LDGSTS or TMA) in a pipelined loop")
    return out
