"""The template instantiations NVRTC compiles from each csrc/*.cu source: those the cupy wrappers ask for, plus
the tensor-core attention kernel (which has no cupy wrapper), so that CI and `gpuforge inspect` compile every
kernel's device code under NVRTC for sm_80 and sm_90a."""

NAME_EXPRESSIONS = {
    "vector_add.cu": [f"gpuforge::vector_add_{kind}_kernel<{t}>" for kind in ("vec16", "scalar")
                      for t in ("float", "__half", "__nv_bfloat16")],
    "rms_norm.cu": [f"gpuforge::rms_norm_forward_kernel<{t}, {v}, {res}>"
                    for t, vec in (("float", 4), ("__half", 8), ("__nv_bfloat16", 8)) for v in (1, vec)
                    for res in ("true", "false")]
                   + [f"gpuforge::rms_norm_backward_kernel<{t}, {v}, {dh}, {atomic}>"
                      for t, vec in (("float", 4), ("__half", 8), ("__nv_bfloat16", 8)) for v in (1, vec)
                      for dh in ("true", "false") for atomic in ("true", "false")]
                   + [f"gpuforge::rms_norm_sum_partials_kernel<{t}>"
                      for t in ("float", "__half", "__nv_bfloat16")],
    "matmul.cu": [f"gpuforge::matmul_tiled_kernel<{t}>" for t in ("float", "__half", "__nv_bfloat16")]
    + [f"gpuforge::matmul_mma_kernel<{t}>" for t in ("__half", "__nv_bfloat16")],
    # no cupy wrapper; instantiated so that CI compiles the tensor-core kernel's device code under NVRTC
    "flash_attention.cu": [f"gpuforge::flash_attention_fwd_mma_kernel<{t}, {d}>" for t in ("__half", "__nv_bfloat16")
                           for d in (64, 128)],
    "flash_attention_bwd.cu": [f"gpuforge::flash_attention_bwd_{kind}_kernel<{t}, {p}>"
                               for kind in ("delta", "dq", "dkdv") for t in ("float", "__half", "__nv_bfloat16")
                               for p in (1, 2, 4, 8)],
    "flash_attention_bwd_mma.cu": [f"gpuforge::flash_attention_bwd_{kind}_mma_kernel<{t}, {d}>"
                                   for kind in ("dq", "dkdv") for t in ("__half", "__nv_bfloat16") for d in (64, 128)],
    "int4_matmul.cu": [f"gpuforge::int4_matmul_tiled_kernel<{x}, {s}>" for x in ("__half", "__nv_bfloat16")
                       for s in ("float", "__half", "__nv_bfloat16")],
}
