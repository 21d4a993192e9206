"""gf.paged_attention against float64 attention over the gathered pages, plus its torch.library contract.

Under the interpreter a split holds 32 tokens and a tile 16, so the contexts here (1, 37, 100) cross tiles,
pages and splits; pages are shuffled across sequences as a serving allocator leaves them."""

import math

import pytest
import torch

import gpuforge as gf
from gpuforge.kernels import backends
from gpuforge.kernels import paged_attention as pa
from gpuforge.kernels.flash_attention import attention_math
from tests.helpers import assert_close_rel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = backends.is_available("triton")[0] and backends.runs_on("triton", DEVICE)
needs_triton = pytest.mark.skipif(not TRITON, reason="triton cannot run here (no GPU, interpreter off)")
TOL = {torch.float32: 5e-3 if DEVICE.type == "cuda" else 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def reference64(q, k_cache, v_cache, block_table, seq_lens, scale):
    return pa.paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), block_table, seq_lens,
                                        scale)


def test_reference_gathers_the_right_tokens():
    """Independent of the page gather: write a dense K/V into pages by hand, then compare with dense math."""
    heads_kv, d, block_size, length = 2, 8, 4, 10
    k, v = torch.randn(heads_kv, length, d, dtype=torch.float64), torch.randn(heads_kv, length, d,
                                                                              dtype=torch.float64)
    pages = [5, 0, 3]
    k_cache = torch.zeros(6, block_size, heads_kv, d, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    for t in range(length):
        k_cache[pages[t // block_size], t % block_size] = k[:, t]
        v_cache[pages[t // block_size], t % block_size] = v[:, t]
    q = torch.randn(1, 4, d, dtype=torch.float64)
    out = pa.paged_attention_reference(q, k_cache, v_cache, torch.tensor([pages], dtype=torch.int32),
                                       torch.tensor([length], dtype=torch.int32), 0.3)
    expected = attention_math(q[:, :, None], k[None], v[None], 0.3, -1, -1)[0][:, :, 0]
    torch.testing.assert_close(out, expected)


# (B, Hq, Hkv, D, block_size, seq_lens): GQA 2 / MQA 8 / MHA, block sizes 16, 5 (not a power of two), 32
CASES = [
    (3, 4, 2, 64, 16, [1, 37, 100]),
    (2, 8, 1, 32, 5, [0, 70]),  # an empty sequence gives zeros
    (1, 2, 2, 96, 32, [33]),
    (1, 1, 1, 256, 16, [17]),
]


@needs_triton
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-D{}-bs{}-{}".format(*c))
def test_triton_matches_float64(case, dtype):
    b, hq, hkv, d, bs, lens = case
    inputs = pa.random_paged_cache(b, hq, hkv, d, bs, lens, dtype, DEVICE)
    out = gf.paged_attention(*inputs, backend="triton")
    assert out.shape == (b, hq, d) and out.dtype == dtype
    assert_close_rel(out, reference64(*inputs, 1 / math.sqrt(d)), TOL[dtype], f"{case} {dtype}")


@needs_triton
def test_strided_query_and_custom_scale():
    q, k_cache, v_cache, table, lens = pa.random_paged_cache(2, 4, 2, 32, 8, [9, 40], device=DEVICE)
    q_strided = torch.randn(2, 8, 32, device=DEVICE)[:, ::2]
    out = gf.paged_attention(q_strided, k_cache, v_cache, table, lens, scale=0.05, backend="triton")
    assert_close_rel(out, reference64(q_strided, k_cache, v_cache, table, lens, 0.05), TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", list(TOL))
def test_several_new_tokens_are_causal_among_themselves(dtype):
    """Sq = 3 new tokens (their K/V the last 3 cached): token i sees seq_len − 2 + i tokens, as dense causal
    attention with Sq != Sk does; a sequence shorter than Sq leaves its first rows with no token (zeros)."""
    gen = torch.Generator().manual_seed(3)
    _, k_cache, v_cache, table, lens = pa.random_paged_cache(3, 4, 2, 32, 8, [2, 37, 70], dtype, DEVICE, gen)
    q = torch.randn(3, 4, 3, 32, generator=gen).to(device=DEVICE, dtype=dtype)
    out = gf.paged_attention(q, k_cache, v_cache, table, lens, backend="triton")
    assert out.shape == q.shape
    expected = torch.zeros(q.shape, dtype=torch.float64)
    for b, length in enumerate(lens.tolist()):
        k, v = (pa.gather_kv(c.double(), table, b, length)[None] for c in (k_cache, v_cache))
        expected[b] = attention_math(q[b][None].double(), k, v, 32 ** -0.5, -1, 0)[0][0]
    assert expected[0, :, 0].abs().sum() == 0  # the 2-token sequence: its first new token sees nothing
    assert_close_rel(out, expected, TOL[dtype], str(dtype))
    one_at_a_time = gf.paged_attention(q[:, :, -1], k_cache, v_cache, table, lens, backend="triton")
    assert_close_rel(one_at_a_time, out[:, :, -1], TOL[dtype], "the last new token == single-token decode")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_and_compile(backend):
    if backend == "triton" and not TRITON:
        pytest.skip("triton cannot run here")
    inputs = pa.random_paged_cache(2, 4, 2, 16, 8, [5, 19], device=DEVICE)
    torch.library.opcheck(torch.ops.gpuforge.paged_attention.default, (*inputs, 0.25, backend))
    compiled = torch.compile(lambda *t: gf.paged_attention(*t, scale=0.25, backend=backend) + 1, fullgraph=True)
    assert_close_rel(compiled(*inputs), reference64(*inputs, 0.25) + 1, TOL[torch.float32])


def test_auto_uses_torch_on_cpu_tensors():
    assert pa.BACKENDS.select("auto", torch.device("cpu")) == "torch"


def _inputs(**changes):
    args = dict(zip(("q", "k_cache", "v_cache", "block_table", "seq_lens"),
                    pa.random_paged_cache(2, 4, 2, 8, 4, [3, 6]), strict=True))
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"q": torch.ones(2, 4, 1, 1, 8)}, ValueError, r"q: expected a \(B, Hq, D\) or \(B, Hq, Sq, D\)"),
        ({"seq_lens": torch.tensor([3, 9], dtype=torch.int32)}, ValueError, r"seq_lens: expected values in 0..8"),
        ({"seq_lens": torch.tensor([-1, 2], dtype=torch.int32)}, ValueError, r"seq_lens: expected values in 0..8"),
        ({"q": torch.ones(2, 4, 16)}, ValueError, "k_cache: expected head dim D=16"),
        ({"q": torch.ones(2, 3, 8)}, ValueError, "Hq=3 must be a multiple of .* Hkv=2"),
        ({"q": torch.ones(3, 4, 8)}, ValueError, "block_table, seq_lens: expected batch 3"),
        ({"v_cache": torch.ones(1, 4, 2, 8)}, ValueError, "v_cache: expected shape"),
        ({"k_cache": torch.ones(4, 4, 2, 8, dtype=torch.float16)}, TypeError, "k_cache: expected dtype torch.float32"),
        ({"block_table": torch.zeros(2, 2, dtype=torch.int64)}, TypeError, "block_table: expected dtype int32"),
        ({"seq_lens": torch.ones(2)}, TypeError, "seq_lens: expected dtype int32"),
        ({"seq_lens": torch.ones(2, 1, dtype=torch.int32)}, ValueError, "seq_lens: expected a 1-D tensor"),
    ],
)
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        gf.paged_attention(**_inputs(**changes))


def test_exported_from_package():
    assert "paged_attention" in gf.__all__


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_long_contexts(dtype):
    lens = [4096, 1, 3000, 8191, 517, 2048, 16, 12345]
    inputs = pa.random_paged_cache(8, 32, 8, 128, 16, lens, dtype, "cuda")
    assert_close_rel(gf.paged_attention(*inputs, backend="triton"), reference64(*inputs, 128 ** -0.5), TOL[dtype])


# --- index tensors: never read outside the cache -----------------------------------------------------------

PAGED_BACKENDS = ["torch"] + (["triton"] if TRITON else [])


def _small_cache(num_blocks=5, block_size=4, lens=(7, 3)):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), 4, 8, generator=g).to(DEVICE)
    cache = torch.randn(num_blocks, block_size, 2, 8, generator=g).to(DEVICE)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    return q, cache, table, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("page", [5, -1, 1_000_000], ids=["one-past-the-end", "minus-one", "far-outside"])
def test_a_page_outside_the_cache_is_an_error_not_a_read(backend, page):
    q, cache, table, lens = _small_cache()
    table[0, 1] = page  # sequence 0 has 7 tokens in pages of 4: it uses entry 1
    with pytest.raises(ValueError, match=rf"block_table: 1 page number\(s\) .* outside the cache's 0..4; "
                                         rf"first at \[0, 1\] = {page}"):
        gf.paged_attention(q, cache, cache, table, lens, backend=backend)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_unused_entries_may_hold_anything(backend):
    """Entries past a sequence's pages are never read: −1 (unassigned) there is fine."""
    q, cache, table, lens = _small_cache()
    table[1, 1] = -1  # sequence 1 has 3 tokens: one page
    out = gf.paged_attention(q, cache, cache, table, lens, backend=backend)
    assert_close_rel(out, reference64(q, cache, cache, table.clamp(min=0), lens, 8 ** -0.5), 2e-5)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_an_empty_cache_with_tokens_is_an_error(backend):
    q, cache, table, lens = _small_cache()
    with pytest.raises(ValueError, match="block_table: .* outside the cache's 0..-1"):
        gf.paged_attention(q, cache[:0], cache[:0], table, lens, backend=backend)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_strided_block_table_and_seq_lens(backend):
    """A transposed block table and a strided seq_lens are read through their strides."""
    q, cache, table, lens = _small_cache(num_blocks=6)
    table_t = torch.tensor([[4, 2], [0, 5]], dtype=torch.int32, device=DEVICE).T  # rows [4, 0], [2, 5]
    lens_strided = torch.tensor([7, 99, 3, 99], dtype=torch.int32, device=DEVICE)[::2]
    assert table_t.stride() == (1, 2) and lens_strided.stride() == (2,)
    out = gf.paged_attention(q, cache, cache, table_t, lens_strided, backend=backend)
    want = reference64(q, cache, cache, table_t.contiguous(), lens_strided.contiguous(), 8 ** -0.5)
    assert_close_rel(out, want, 2e-5)


def test_check_inputs_is_a_bool_and_can_be_turned_off():
    q, cache, table, lens = _small_cache()
    with pytest.raises(TypeError, match="check_inputs: expected a bool"):
        gf.paged_attention(q, cache, cache, table, lens, check_inputs=1)
    out = gf.paged_attention(q, cache, cache, table, lens, check_inputs=False, backend="torch")
    assert_close_rel(out, reference64(q, cache, cache, table, lens, 8 ** -0.5), 1e-6)
