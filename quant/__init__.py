"""gpuforge.quant: weight-only int4 (W4A16) quantization — the packed format (defined with the kernels that read
it, gpuforge.kernels.int4_format, and re-exported here), RTN / GPTQ / AWQ quantizers, Int4Linear, whose forward
runs gf.int4_matmul, and whole-model quantization (`quantize_model`, and `quantize_` with Int4WeightOnlyConfig in
torchao's shape)."""

from gpuforge.kernels.int4_format import Int4Weight, dequantize_int4, pack_int4, unpack_int4
from gpuforge.quant.api import Int4WeightOnlyConfig, quantize_
from gpuforge.quant.linear import Int4Linear
from gpuforge.quant.model import quantize_model
from gpuforge.quant.quantize import quantize_int4

__all__ = ["Int4Linear", "Int4Weight", "Int4WeightOnlyConfig", "dequantize_int4", "pack_int4", "quantize_",
           "quantize_int4", "quantize_model", "unpack_int4"]
