"""Attention core, forward + backward: latent_em's implementations vs PyTorch SDPA.

Times d/d(q, k, v) of sum(attention(q, k, v) * w) for one layer's causal GQA attention over
[B, T] tokens (one segment per row), per implementation of `latent_em.attention.attend` that
runs on this backend, and `torch.nn.functional.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)`. Implementations alternate, so all see the same machine load; compilation
and one warm-up call are not timed. Outputs are checked against the reference first.

  python benchmarks/attention.py                     # the small train-step preset's layer
  python benchmarks/attention.py --seq=256 --heads=4 --kv_heads=2 --head_dim=32   # tiny
  python benchmarks/attention.py --blocks=32,64,128  # the blocked implementation's block size

Results are recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from latent_em import attention  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--implementations", default="reference,blocked,xla",
                 help="comma-separated attention.IMPLEMENTATIONS to time")
  p.add_argument("--blocks", default="",
                 help="comma-separated block sizes: time 'blocked' once per size")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--skip_torch", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  b, t, h, k, dh = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  rng = np.random.default_rng(0)
  q, kk, v, w = (rng.standard_normal(s, np.float32) for s in
                 [(b, t, h, dh), (b, t, k, dh), (b, t, k, dh), (b, t, h, dh)])

  def make(impl, block=None):
    def loss(q, k, v):
      if block:
        out = attention._blocked(q, k, v, None, jnp.float32, block)
      else:
        out = attention.attend(q, k, v, None, jnp.float32, impl)
      return jnp.sum(out * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  fns = {name: make(name) for name in args.implementations.split(",") if name}
  for block in (int(x) for x in args.blocks.split(",") if x):
    fns[f"blocked({block})"] = make("blocked", block)
  inputs = [jnp.asarray(x) for x in (q, kk, v)]
  ref = make("reference")(*inputs)
  for name, fn in fns.items():
    out = fn(*inputs)
    err = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(out[1], ref[1]))
    print(f"{name}: loss {float(out[0]):.4f} (reference {float(ref[0]):.4f}), "
          f"max |grad - reference grad| {err:.2e}")

  calls = {name: (lambda fn=fn: jax.block_until_ready(fn(*inputs))) for name, fn in fns.items()}
  if not args.skip_torch:
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_()
                  for x in (q, kk, v))
    tw = torch.tensor(w).transpose(1, 2)

    def torch_step():
      out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                             enable_gqa=True)
      (out * tw).sum().backward()
      tq.grad = tk.grad = tv.grad = None

    calls["torch sdpa"] = torch_step
  times = {name: [] for name in calls}
  for name, call in calls.items():  # warm-up
    call()
  for _ in range(args.repeats):
    for name, call in calls.items():
      t0 = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - t0)
  print(f"\nB={b} T={t} H={h} K={k} Dh={dh} fp32, forward + backward, {args.repeats} alternating "
        f"repeats; load average {os.getloadavg()[0]:.2f}")
  print(f"{'implementation':<16}{'min ms':>10}{'median ms':>11}")
  for name, ts in times.items():
    print(f"{name:<16}{min(ts) * 1e3:>10.1f}{statistics.median(ts) * 1e3:>11.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
