"""gpuforge.quant: weight-only int4 (W4A16) quantization — the packed format, RTN / GPTQ / AWQ quantizers,
whole-model quantization, and Int4Linear, whose forward runs gf.int4_matmul."""

from gpuforge.quant.format import Int4Weight, dequantize_int4, pack_int4, unpack_int4
from gpuforge.quant.linear import Int4Linear
from gpuforge.quant.quantize import quantize_int4, quantize_model

__all__ = ["Int4Linear", "Int4Weight", "dequantize_int4", "pack_int4", "quantize_int4", "quantize_model",
           "unpack_int4"]
