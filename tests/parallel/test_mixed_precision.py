"""Mixed precision in ZeRO-1/2 (ZeroRedundancyOptimizer) and ZeRO-3 (FullyShardedDataParallel): low-precision
parameters and gradients, float32 master weights and optimizer state, fp16 dynamic loss scaling.

- parity with a single-process reference doing the same arithmetic (each rank's bf16/fp16 backward, gradients
  averaged in float32, AdamW on float32 masters, cast back), on gloo at N = 2 and 4 and on MPI;
- bf16 with float32 masters tracks a float32 run of the same model on the concatenated batch;
- fp16 (clipping after unscaling): a step whose gradient overflows in one rank's shard only is skipped on
  every rank (the inf/nan flag is agreed by one all-reduce), the scale backs off, then grows back.
"""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from gpuforge.parallel.data_parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.data_parallel.mixed_precision import LossScaler, MixedPrecision, MixedPrecisionOptimizer
from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer
from tests.parallel.dist_harness import make_batches, run_distributed, shard

pytestmark = pytest.mark.distributed
D, H, PER_RANK, LR = 6, 16, 4, 0.01
SCALER = dict(init_scale=2.0 ** 8, growth_interval=2)  # small interval: the test sees the scale grow back
CLIP = 0.05  # below the gradient norm: the fp16 runs clip every step


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(D, H), torch.nn.Linear(H, D)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.head = torch.nn.Linear(D, D)

    def forward(self, x):
        return self.head(self.blocks(x))


def _net(dtype) -> Net:
    """The same initial values for every run: float32 weights rounded to `dtype` (then held in float32)."""
    torch.manual_seed(0)
    return Net().to(dtype).float()


def _overflows(rank, step) -> bool:
    """Rank 1's first step: the head bias's last gradient element is inf (an fp16 overflow). It is the last
    element of the last flat buffer, so it lands in rank 1's shard only: rank 0 learns of it from the flag."""
    return rank == 1 and step == 0


def _rank_batch(x, y, rank, world, dtype):
    return shard(x, rank, world).to(dtype), shard(y, rank, world).to(dtype)


def _run(comm, strategy, dtype, reduce_dtype, steps, overflow):
    """Train; return this rank's float32 master shards as (parameter names, numels, shard) per flat buffer."""
    mp = MixedPrecision(param_dtype=dtype, reduce_dtype=reduce_dtype)
    model = _net(dtype)
    names = {p: n for n, p in model.named_parameters()}
    clock = [0]

    def overflow_hook(p):
        if _overflows(comm.rank, clock[0]):
            p.grad.view(-1)[-1] = float("inf")

    if overflow:  # registered first, so it runs before FSDP's reduce-scatter hook
        model.head.bias.register_post_accumulate_grad_hook(overflow_hook)
    if strategy == "fsdp":
        fwd = FullyShardedDataParallel(model, comm, mixed_precision=mp)
        opt = torch.optim.AdamW(fwd.shard_parameters(), lr=LR)
        flats = [(u.params, u.shard) for u in fwd.units]
    else:
        fwd = model.to(dtype)
        opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, comm,
                                      zero_stage={"zero1": 1, "zero2": 2}[strategy], mixed_precision=mp, lr=LR)
        flats = [(opt.params, opt.shard)]
    scaler = LossScaler(comm, **SCALER) if dtype == torch.float16 else None
    taken, scales = [], []
    comm.ledger.clear()
    for step, (x, y) in enumerate(make_batches(steps, comm.world_size, PER_RANK, d=D, dtype=torch.float32)):
        x, y = _rank_batch(x, y, comm.rank, comm.world_size, dtype)
        clock[0] = comm.ledger.step = step
        opt.zero_grad()
        loss = F.mse_loss(fwd(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
            continue
        scaler.scale(loss).backward()
        if not scaler.unscale_(opt):  # torch.amp's order: unscale, clip the true gradient, step
            (fwd if strategy == "fsdp" else opt).clip_grad_norm_(CLIP)
        taken.append(scaler.step(opt))
        scaler.update()
        scales.append(scaler.scale_value)
    masters = [([names[p] for p in ps], [p.numel() for p in ps], s.detach().clone()) for ps, s in flats]
    return dict(masters=masters, taken=taken, scales=scales, wire=comm.ledger.wire_bytes(step=1),
                padded=sum(s.numel() for _, s in flats) * comm.world_size)


def _runs(comm, strategies, dtype, reduce_dtype, steps, overflow=False):
    return {s: _run(comm, s, dtype, reduce_dtype, steps, overflow) for s in strategies}


def _full_masters(results, strategy) -> dict[str, torch.Tensor]:
    """Every rank's shards put back together, by parameter name (flat)."""
    out = {}
    for k, (names, numels, _) in enumerate(results[0][strategy]["masters"]):
        flat = torch.cat([res[strategy]["masters"][k][2] for res in results])
        out.update(zip(names, flat[:sum(numels)].split(numels), strict=True))
    return out


def _reference(world, dtype, steps, overflow=False):
    """One process, the same arithmetic: each rank's backward in `dtype`, the gradients summed in float32 and
    divided by N, (fp16: unscaled, a step with inf/nan skipped), AdamW on float32 masters, cast back."""
    model = _net(dtype).to(dtype)
    masters = {n: torch.nn.Parameter(p.detach().float()) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(masters.values(), lr=LR)
    scale, good, taken = SCALER["init_scale"], 0, []
    for step, (x, y) in enumerate(make_batches(steps, world, PER_RANK, d=D, dtype=torch.float32)):
        total = {n: torch.zeros_like(m) for n, m in masters.items()}
        for rank in range(world):
            model.zero_grad()
            xr, yr = _rank_batch(x, y, rank, world, dtype)
            loss = F.mse_loss(model(xr), yr)
            (loss * scale if dtype == torch.float16 else loss).backward()
            if overflow and _overflows(rank, step):
                model.head.bias.grad[-1] = float("inf")
            for n, p in model.named_parameters():
                total[n] += p.grad.float()
        for n, m in masters.items():
            m.grad = total[n] / world * (1.0 / scale if dtype == torch.float16 else 1.0)
        finite = all(bool(torch.isfinite(m.grad).all()) for m in masters.values())
        taken.append(finite)
        if finite:
            if dtype == torch.float16:
                assert torch.nn.utils.clip_grad_norm_(masters.values(), CLIP) > CLIP
            opt.step()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(masters[n])
        good = good + 1 if finite else 0
        scale = scale * 0.5 if not finite else (scale * 2 if good % SCALER["growth_interval"] == 0 else scale)
    return {n: m.detach() for n, m in masters.items()}, taken


def _max_diff(a, b) -> float:
    return max((a[n].view_as(b[n]) - b[n]).abs().max().item() for n in b)


@pytest.mark.parametrize("world,kind,strategies", [(2, "torch", ("zero1", "zero2", "fsdp")),
                                                   (4, "torch", ("zero1", "fsdp")), (2, "mpi", ("zero1", "zero2"))])
def test_bf16_matches_same_arithmetic_reference(world, kind, strategies):
    steps = 4
    results = run_distributed(_runs, world, strategies, torch.bfloat16, torch.float32, steps, comm=kind)
    ref, _ = _reference(world, torch.bfloat16, steps)
    for strategy in strategies:
        # float32 sums of a few bf16 gradients are exact whatever the order: only rounding-free differences remain
        assert _max_diff(_full_masters(results, strategy), ref) <= 1e-6, strategy


def test_fp16_loss_scaling_skips_the_overflowing_step_on_every_rank():
    steps = 5
    results = run_distributed(_runs, 2, ("zero2", "fsdp"), torch.float16, torch.float32, steps, True)
    ref, ref_taken = _reference(2, torch.float16, steps, overflow=True)
    assert ref_taken == [False] + [True] * (steps - 1)
    for strategy in ("zero2", "fsdp"):
        for res in results:  # every rank skipped step 0 (only rank 1 overflowed), backed off, then grew back
            assert res[strategy]["taken"] == ref_taken
            assert res[strategy]["scales"] == [128.0, 128.0, 256.0, 256.0, 512.0]
        assert _max_diff(_full_masters(results, strategy), ref) <= 1e-6, strategy


def _single_process(world, steps, dtype):
    """Plain training on the concatenated batch: float32, or `dtype` with float32 masters."""
    model = _net(dtype).to(dtype)
    if dtype == torch.float32:
        opt, masters = torch.optim.AdamW(model.parameters(), lr=LR), list(model.parameters())
    else:
        opt = MixedPrecisionOptimizer(model.parameters(), torch.optim.AdamW, lr=LR)
        masters = opt.master_params
    for x, y in make_batches(steps, world, PER_RANK, d=D, dtype=torch.float32):
        opt.zero_grad()
        F.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
        opt.step()
    return {n: m.detach() for (n, _), m in zip(model.named_parameters(), masters, strict=True)}


def test_bf16_with_fp32_master_tracks_fp32_training():
    steps, world = 6, 2
    results = run_distributed(_runs, world, ("zero2", "fsdp"), torch.bfloat16, None, steps)
    fp32 = _single_process(world, steps, torch.float32)
    # the yardstick (flash-attention's rule): one process training in bf16 with fp32 masters on the same
    # batch. Its distance to fp32 is bf16 rounding (u = 2^-8) in every forward and backward, amplified where
    # Adam normalises a gradient near zero; sharding and averaging across ranks must not add more than that.
    yardstick = _max_diff(_single_process(world, steps, torch.bfloat16), fp32)
    assert 0 < yardstick < steps * LR  # bf16 changed the result, by less than the training moved it
    for strategy, passes in (("zero2", 2), ("fsdp", 3)):
        diff = _max_diff(_full_masters(results, strategy), fp32)
        assert 0 < diff <= 2 * yardstick, (strategy, diff, yardstick)
        # bf16 on the wire: ZeRO-2 reduce-scatter + all-gather, ZeRO-3 two all-gathers + reduce-scatter, of
        # Ψ_pad·2 bytes each, ring cost (N-1)/N
        res = results[0][strategy]
        assert res["wire"] == Fraction(passes * (world - 1), world) * res["padded"] * 2, strategy


def test_bad_mixed_precision_use_is_rejected():
    with pytest.raises(TypeError, match="param_dtype must be torch.float16 or torch.bfloat16"):
        MixedPrecision(param_dtype=torch.float32)
    with pytest.raises(TypeError, match="mixed_precision must be a MixedPrecision"):
        ZeroRedundancyOptimizer(Net().parameters(), torch.optim.AdamW, None, mixed_precision=torch.bfloat16)
    with pytest.raises(TypeError, match="convert the model first"):
        ZeroRedundancyOptimizer(Net().parameters(), torch.optim.AdamW, None, mixed_precision=MixedPrecision())
    with pytest.raises(TypeError, match="trainable parameters must be float32"):
        FullyShardedDataParallel(Net().to(torch.bfloat16), None, mixed_precision=MixedPrecision())
    with pytest.raises(ValueError, match="backoff_factor"):
        LossScaler(backoff_factor=2.0)
