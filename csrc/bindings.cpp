// gpuforge._C: the one pybind11 module over csrc/*.cu. Pointers and streams arrive as integers from
// `tensor.data_ptr()` and `torch.cuda.current_stream().cuda_stream`; the checks here guard what the Python
// side cannot see (codes, sizes), and every CUDA error becomes a Python RuntimeError naming the call.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "launchers.h"

namespace py = pybind11;
using gpuforge::DType;

namespace {

void throw_if_error(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("gpuforge._C.") + what + ": CUDA error " + cudaGetErrorName(err) +
                             " (" + std::to_string(static_cast<int>(err)) + "): " + cudaGetErrorString(err));
}

DType checked_dtype(int code, const char* arg) {
  if (code < 0 || code > static_cast<int>(DType::BFloat16))
    throw std::invalid_argument(std::string(arg) + ": unknown dtype code " + std::to_string(code) +
                                " (expected 0=float32, 1=float16, 2=bfloat16)");
  return static_cast<DType>(code);
}

void check_nonnegative(int64_t value, const char* arg) {
  if (value < 0) throw std::invalid_argument(std::string(arg) + " must be >= 0, got " + std::to_string(value));
}

// The attention kernels' preconditions (forward and backward): sizes, GQA grouping, grid limits, window.
void check_attention_problem(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k,
                             int64_t head_dim, int64_t window_left, int64_t window_right) {
  check_nonnegative(batch, "batch");
  check_nonnegative(seqlen_q, "seqlen_q");
  check_nonnegative(seqlen_k, "seqlen_k");
  if (head_dim < 1 || head_dim > 256)
    throw std::invalid_argument("head_dim must be in 1..256, got " + std::to_string(head_dim));
  if (heads_kv < 1 || heads_q % heads_kv)
    throw std::invalid_argument("heads_q (" + std::to_string(heads_q) + ") must be a multiple of heads_kv (" +
                                std::to_string(heads_kv) + ")");
  if (batch * heads_q > 65535)  // the grid's y dimension
    throw std::invalid_argument("batch * heads_q must be <= 65535, got " + std::to_string(batch * heads_q));
  if (window_left < -1 || window_right < -1)
    throw std::invalid_argument("window_left and window_right must be >= -1");
}

template <typename T>
T* as_ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gpuforge CUDA C++ kernels (torch-free; pointers, sizes and streams from Python)";

  m.def("device_count", [] {
    int count = 0;
    throw_if_error(cudaGetDeviceCount(&count), "device_count");
    return count;
  }, "Number of CUDA devices; raises RuntimeError with the CUDA error when there is no driver or device.");

  m.def("vector_add", [](uintptr_t a, uintptr_t b, uintptr_t out, int64_t n, int dtype, uintptr_t stream) {
    check_nonnegative(n, "n");
    throw_if_error(gpuforge::launch_vector_add(as_ptr<const void>(a), as_ptr<const void>(b), as_ptr<void>(out),
                                               n, checked_dtype(dtype, "dtype"), as_stream(stream)),
                   "vector_add");
  }, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("n"), py::arg("dtype"), py::arg("stream"));

  m.def("softmax_forward", [](uintptr_t x, int64_t x_row_stride, uintptr_t y, int64_t rows, int64_t n, int dtype,
                              uintptr_t stream) {
    check_nonnegative(rows, "rows");
    check_nonnegative(n, "n");
    check_nonnegative(x_row_stride, "x_row_stride");  // 0 is a broadcast (expanded) row
    throw_if_error(gpuforge::launch_softmax_forward(as_ptr<const void>(x), x_row_stride, as_ptr<void>(y), rows, n,
                                                    checked_dtype(dtype, "dtype"), as_stream(stream)),
                   "softmax_forward");
  }, py::arg("x"), py::arg("x_row_stride"), py::arg("y"), py::arg("rows"), py::arg("n"), py::arg("dtype"),
     py::arg("stream"));

  m.def("softmax_backward", [](uintptr_t dy, int64_t dy_row_stride, uintptr_t y, uintptr_t dx, int64_t rows,
                               int64_t n, int dtype, uintptr_t stream) {
    check_nonnegative(rows, "rows");
    check_nonnegative(n, "n");
    check_nonnegative(dy_row_stride, "dy_row_stride");  // 0 is a broadcast (expanded) row
    throw_if_error(gpuforge::launch_softmax_backward(as_ptr<const void>(dy), dy_row_stride, as_ptr<const void>(y),
                                                     as_ptr<void>(dx), rows, n, checked_dtype(dtype, "dtype"),
                                                     as_stream(stream)),
                   "softmax_backward");
  }, py::arg("dy"), py::arg("dy_row_stride"), py::arg("y"), py::arg("dx"), py::arg("rows"), py::arg("n"),
     py::arg("dtype"), py::arg("stream"));

  m.def("matmul", [](uintptr_t a, uintptr_t b, uintptr_t c, int64_t M, int64_t N, int64_t K, int64_t batch,
                     int64_t sa_z, int64_t sa_m, int64_t sa_k, int64_t sb_z, int64_t sb_k, int64_t sb_n, int dtype,
                     uintptr_t stream) {
    check_nonnegative(M, "M");
    check_nonnegative(N, "N");
    check_nonnegative(K, "K");
    check_nonnegative(batch, "batch");
    if (batch > 65535)  // the grid's y dimension; gf.matmul folds the batch into M when b is a matrix
      throw std::invalid_argument("batch must be <= 65535, got " + std::to_string(batch));
    throw_if_error(gpuforge::launch_matmul(as_ptr<const void>(a), as_ptr<const void>(b), as_ptr<void>(c), M, N, K,
                                           batch, sa_z, sa_m, sa_k, sb_z, sb_k, sb_n, checked_dtype(dtype, "dtype"),
                                           as_stream(stream)),
                   "matmul");
  }, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("batch"),
     py::arg("sa_z"), py::arg("sa_m"), py::arg("sa_k"), py::arg("sb_z"), py::arg("sb_k"), py::arg("sb_n"),
     py::arg("dtype"), py::arg("stream"));

  m.def("matmul_wgmma", [](uintptr_t a, uintptr_t b, uintptr_t c, int64_t M, int64_t N, int64_t K, int64_t batch,
                           int64_t sa_z, int64_t sa_m, int64_t sa_k, int64_t sb_z, int64_t sb_k, int64_t sb_n,
                           int dtype, uintptr_t stream) {
    check_nonnegative(M, "M");
    check_nonnegative(N, "N");
    check_nonnegative(K, "K");
    check_nonnegative(batch, "batch");
    throw_if_error(gpuforge::launch_matmul_wgmma(as_ptr<const void>(a), as_ptr<const void>(b), as_ptr<void>(c), M,
                                                 N, K, batch, sa_z, sa_m, sa_k, sb_z, sb_k, sb_n,
                                                 checked_dtype(dtype, "dtype"), as_stream(stream)),
                   "matmul_wgmma (fp16/bf16, rows 16-byte aligned, K and N multiples of 8, compute capability 9.0)");
  }, py::arg("a"), py::arg("b"), py::arg("c"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("batch"),
     py::arg("sa_z"), py::arg("sa_m"), py::arg("sa_k"), py::arg("sb_z"), py::arg("sb_k"), py::arg("sb_n"),
     py::arg("dtype"), py::arg("stream"));

  m.def("int4_matmul", [](uintptr_t x, uintptr_t qweight, uintptr_t scales, uintptr_t zeros, uintptr_t out,
                          uintptr_t workspace, int64_t M, int64_t N, int64_t K, int64_t group_size, int64_t split_k,
                          int x_dtype, int scale_dtype, uintptr_t stream) {
    check_nonnegative(M, "M");
    check_nonnegative(N, "N");
    check_nonnegative(split_k, "split_k");
    const DType xt = checked_dtype(x_dtype, "x_dtype");
    if (xt == DType::Float32) throw std::invalid_argument("x_dtype: expected float16 or bfloat16, got float32");
    if (K <= 0 || K % 2) throw std::invalid_argument("K must be positive and even, got " + std::to_string(K));
    if (group_size <= 0 || K % group_size)
      throw std::invalid_argument("group_size must divide K=" + std::to_string(K) + ", got " +
                                  std::to_string(group_size));
    if (K > INT32_MAX || N > INT32_MAX) throw std::invalid_argument("K and N must fit in 32 bits");
    if (split_k > 0) {
      if (M > 16) throw std::invalid_argument("M: the decode kernel (split_k > 0) takes M <= 16, got " +
                                              std::to_string(M));
      if (K % 32 || group_size % 32 || K % split_k || (K / split_k) % 32)
        throw std::invalid_argument("split_k: the decode kernel needs K, group_size and K / split_k multiples of 32"
                                    " (K=" + std::to_string(K) + ", group_size=" + std::to_string(group_size) +
                                    ", split_k=" + std::to_string(split_k) + ")");
      if (x % 16 || qweight % 16) throw std::invalid_argument("x, qweight: the decode kernel needs 16-byte alignment");
      if (split_k > 1 && workspace == 0) throw std::invalid_argument("workspace: needed when split_k > 1");
    }
    throw_if_error(gpuforge::launch_int4_matmul(as_ptr<const void>(x), as_ptr<const unsigned char>(qweight),
                                                as_ptr<const void>(scales), as_ptr<const unsigned char>(zeros),
                                                as_ptr<void>(out), as_ptr<float>(workspace), M, N, K, group_size,
                                                split_k, xt, checked_dtype(scale_dtype, "scale_dtype"),
                                                as_stream(stream)),
                   "int4_matmul");
  }, py::arg("x"), py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("out"), py::arg("workspace"),
     py::arg("M"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("split_k"), py::arg("x_dtype"),
     py::arg("scale_dtype"), py::arg("stream"));

  m.def("rms_norm_forward", [](uintptr_t x, int64_t x_row_stride, uintptr_t residual, int64_t residual_row_stride,
                               uintptr_t weight, uintptr_t y, uintptr_t h, uintptr_t rstd, int64_t rows, int64_t n,
                               float eps, int dtype, uintptr_t stream) {
    check_nonnegative(rows, "rows");
    if (n < 1) throw std::invalid_argument("n must be >= 1, got " + std::to_string(n));
    if (!(eps > 0.f)) throw std::invalid_argument("eps must be > 0, got " + std::to_string(eps));
    if ((residual == 0) != (h == 0))
      throw std::invalid_argument("residual and h: give both (fused add) or neither");
    throw_if_error(gpuforge::launch_rms_norm_forward(
                       as_ptr<const void>(x), x_row_stride, as_ptr<const void>(residual), residual_row_stride,
                       as_ptr<const void>(weight), as_ptr<void>(y), as_ptr<void>(h), as_ptr<float>(rstd), rows, n,
                       eps, checked_dtype(dtype, "dtype"), as_stream(stream)),
                   "rms_norm_forward");
  }, py::arg("x"), py::arg("x_row_stride"), py::arg("residual"), py::arg("residual_row_stride"), py::arg("weight"),
     py::arg("y"), py::arg("h"), py::arg("rstd"), py::arg("rows"), py::arg("n"), py::arg("eps"), py::arg("dtype"),
     py::arg("stream"));

  m.def("rms_norm_backward_blocks", [](int64_t rows, int device) {
    check_nonnegative(rows, "rows");
    int blocks = 0;
    throw_if_error(gpuforge::rms_norm_backward_blocks(rows, device, &blocks), "rms_norm_backward_blocks");
    return blocks;
  }, py::arg("rows"), py::arg("device"));

  m.def("rms_norm_backward", [](uintptr_t dy, int64_t dy_row_stride, uintptr_t x, int64_t x_row_stride,
                                uintptr_t weight, uintptr_t rstd, uintptr_t dh, int64_t dh_row_stride, uintptr_t dx,
                                uintptr_t dw, uintptr_t partial, int blocks, int64_t rows, int64_t n,
                                bool deterministic, int dtype, uintptr_t stream) {
    check_nonnegative(rows, "rows");
    if (n < 1) throw std::invalid_argument("n must be >= 1, got " + std::to_string(n));
    if (blocks < 1) throw std::invalid_argument("blocks must be >= 1, got " + std::to_string(blocks));
    throw_if_error(gpuforge::launch_rms_norm_backward(
                       as_ptr<const void>(dy), dy_row_stride, as_ptr<const void>(x), x_row_stride,
                       as_ptr<const void>(weight), as_ptr<const float>(rstd), as_ptr<const void>(dh), dh_row_stride,
                       as_ptr<void>(dx), as_ptr<void>(dw), as_ptr<float>(partial), blocks, rows, n, deterministic,
                       checked_dtype(dtype, "dtype"), as_stream(stream)),
                   "rms_norm_backward");
  }, py::arg("dy"), py::arg("dy_row_stride"), py::arg("x"), py::arg("x_row_stride"), py::arg("weight"),
     py::arg("rstd"), py::arg("dh"), py::arg("dh_row_stride"), py::arg("dx"), py::arg("dw"), py::arg("partial"),
     py::arg("blocks"), py::arg("rows"), py::arg("n"), py::arg("deterministic"), py::arg("dtype"), py::arg("stream"));

  // The tensor-core forwards of csrc/flash_attention.cu and, explicitly (compute capability 9.0, fp16/bf16, D 128,
  // 16-byte aligned rows), the sm_90a kernel of csrc/flash_attention_wgmma.cu: the same arguments.
  using AttentionForward = decltype(&gpuforge::launch_flash_attention_forward);
  const auto def_attention_forward = [&m](const char* name, AttentionForward launch, const char* what) {
    m.def(name, [launch, what](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, int64_t batch,
                               int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k,
                               int64_t head_dim, int64_t window_left, int64_t window_right, int64_t q_b, int64_t q_h,
                               int64_t q_s, int64_t k_b, int64_t k_h, int64_t k_s, int64_t v_b, int64_t v_h,
                               int64_t v_s, float scale, int dtype, uintptr_t stream) {
      check_attention_problem(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right);
      const int64_t q_strides[3] = {q_b, q_h, q_s}, k_strides[3] = {k_b, k_h, k_s}, v_strides[3] = {v_b, v_h, v_s};
      throw_if_error(launch(as_ptr<const void>(q), as_ptr<const void>(k), as_ptr<const void>(v), as_ptr<void>(out),
                            as_ptr<float>(lse), batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left,
                            window_right, q_strides, k_strides, v_strides, scale, checked_dtype(dtype, "dtype"),
                            as_stream(stream)),
                     what);
    }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("batch"),
       py::arg("heads_q"), py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("head_dim"),
       py::arg("window_left"), py::arg("window_right"), py::arg("q_b"), py::arg("q_h"), py::arg("q_s"),
       py::arg("k_b"), py::arg("k_h"), py::arg("k_s"), py::arg("v_b"), py::arg("v_h"), py::arg("v_s"),
       py::arg("scale"), py::arg("dtype"), py::arg("stream"));
  };
  def_attention_forward("flash_attention_forward", gpuforge::launch_flash_attention_forward,
                        "flash_attention_forward");
  def_attention_forward("flash_attention_forward_wgmma", gpuforge::launch_flash_attention_forward_wgmma,
                        "flash_attention_forward_wgmma (fp16/bf16, D 128, rows 16-byte aligned, strides multiples "
                        "of 8, Sk > 0, compute capability 9.0)");

  m.def("flash_attention_backward", [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t dout,
                                       uintptr_t lse, uintptr_t dlse, uintptr_t dq, uintptr_t dk, uintptr_t dv,
                                       uintptr_t delta, int64_t batch, int64_t heads_q, int64_t heads_kv,
                                       int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim, int64_t window_left,
                                       int64_t window_right, int64_t q_b, int64_t q_h, int64_t q_s, int64_t k_b,
                                       int64_t k_h, int64_t k_s, int64_t v_b, int64_t v_h, int64_t v_s, float scale,
                                       int dtype, uintptr_t stream) {
    check_attention_problem(batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right);
    const int64_t q_strides[3] = {q_b, q_h, q_s}, k_strides[3] = {k_b, k_h, k_s}, v_strides[3] = {v_b, v_h, v_s};
    throw_if_error(gpuforge::launch_flash_attention_backward(
                       as_ptr<const void>(q), as_ptr<const void>(k), as_ptr<const void>(v), as_ptr<const void>(out),
                       as_ptr<const void>(dout), as_ptr<const float>(lse), as_ptr<const float>(dlse),
                       as_ptr<void>(dq), as_ptr<void>(dk), as_ptr<void>(dv), as_ptr<float>(delta), batch, heads_q,
                       heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right, q_strides, k_strides,
                       v_strides, scale, checked_dtype(dtype, "dtype"), as_stream(stream)),
                   "flash_attention_backward");
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("dlse"),
     py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("delta"), py::arg("batch"), py::arg("heads_q"),
     py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("head_dim"), py::arg("window_left"),
     py::arg("window_right"), py::arg("q_b"), py::arg("q_h"), py::arg("q_s"), py::arg("k_b"), py::arg("k_h"),
     py::arg("k_s"), py::arg("v_b"), py::arg("v_h"), py::arg("v_s"), py::arg("scale"), py::arg("dtype"),
     py::arg("stream"));
}
