"""The demo's HuggingFace part: a tiny Llama built from a config (random weights, nothing downloaded), one copy
patched by apply_gpuforge, both trained a few AdamW steps on one batch (so the loss falls); prints both loss
curves and the largest difference (losses and final parameters). On a GPU the ops run with backend="auto"; on
a CPU with the Triton kernels through the interpreter (slow, but the kernels themselves)."""

from __future__ import annotations

import copy
import os
import time

import torch

# float32 relative tolerances: the losses, and the parameters after the last step (AdamW divides by the root of
# the squared-gradient average, so near-zero gradients turn rounding-level differences into larger steps)
LOSS_TOLERANCE, PARAM_TOLERANCE = 1e-4, 1e-3


def tiny_llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _train(model, batches, lr: float) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for ids in batches:
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run(steps: int = 6) -> bool:
    """Train the two models side by side; True when the curves and the parameters agree within tolerance."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gpuforge.integrations.transformers import apply_gpuforge
    except ImportError as err:
        print(f"the transformers extra is not installed ({err}); pip install 'gpuforge[hf]'")
        return False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = "auto" if device.type == "cuda" else "triton"
    reference = tiny_llama().to(device)
    patched = copy.deepcopy(reference)
    report = apply_gpuforge(patched, backend=backend)
    print(f"tiny Llama (hidden 64, 2 layers, vocab 128) on {device}, backend={backend!r}:")
    for entry, status in report.items():
        print(f"  {entry:<27} {status}")
    ids = torch.randint(3, 128, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    batches = [ids] * steps
    times = []
    curves = []
    for model in (reference, patched):
        start = time.perf_counter()
        curves.append(_train(model, batches, lr=3e-3))
        times.append(time.perf_counter() - start)
    print("step   HF loss      gpuforge loss  |difference|")
    for step, (a, b) in enumerate(zip(*curves, strict=True)):
        print(f"{step:>4}   {a:.6f}     {b:.6f}       {abs(a - b):.2e}")
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(*curves, strict=True))
    param_diff = max(((p - q).abs().max() / q.abs().max()).item()
                     for p, q in zip(patched.parameters(), reference.parameters(), strict=True))
    ok = loss_diff <= LOSS_TOLERANCE and param_diff <= PARAM_TOLERANCE
    print(f"largest relative difference: loss {loss_diff:.2e} (tolerance {LOSS_TOLERANCE:g}), final parameters "
          f"{param_diff:.2e} ({PARAM_TOLERANCE:g}); {steps} steps took HF {times[0]:.1f} s, gpuforge {times[1]:.1f} s"
          f"{' (Triton interpreter)' if device.type == 'cpu' else ''}")
    return ok
