"""The PyTorch character-level baseline that the Shakespeare speed target is measured against.

A self-contained re-implementation of the well-known "baby GPT on CPU" run
(GPT-2 style: learned positions, LayerNorm, GELU MLP, tied head, no biases):
4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 iterations, AdamW lr
1e-3 (100 warmup iterations, cosine to 1e-4), betas (0.9, 0.99), weight decay
0.1 on matrices, clip 1.0, no dropout; evaluation of train and val every 250
iterations on 20 batches, including iteration 0; one `loss.item()` per
iteration (its per-iteration log line). Like the original loop it runs
iterations 0..2000 inclusive.

Not part of lossland and not a test: it needs `pip install torch numpy`.
Alternate it with `launch.train` on the same machine, because this 2-core
host's speed drifts with other tenants:

    python benchmarks/torch_char_lm.py ../shared/data/tinyshakespeare.txt
"""
import math
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
MAX_ITERS, WARMUP, LR, MIN_LR = 2000, 100, 1e-3, 1e-4
EVAL_INTERVAL, EVAL_ITERS = 250, 20


class Block(nn.Module):

  def __init__(self):
    super().__init__()
    self.ln_1 = nn.LayerNorm(N_EMBD, bias=False)
    self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
    self.attn_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
    self.ln_2 = nn.LayerNorm(N_EMBD, bias=False)
    self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
    self.mlp_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

  def forward(self, x):
    b, t, c = x.shape
    q, k, v = self.c_attn(self.ln_1(x)).split(N_EMBD, dim=2)
    q, k, v = (y.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for y in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))
    return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):

  def __init__(self, vocab_size):
    super().__init__()
    self.wte = nn.Embedding(vocab_size, N_EMBD)
    self.wpe = nn.Embedding(BLOCK, N_EMBD)
    self.blocks = nn.ModuleList([Block() for _ in range(N_LAYER)])
    self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
    self.apply(self._init)
    for name, p in self.named_parameters():
      if name.endswith('proj.weight'):
        nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * N_LAYER))

  @staticmethod
  def _init(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, 0.0, 0.02)

  def forward(self, idx, targets):
    x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
    for block in self.blocks:
      x = block(x)
    logits = self.ln_f(x) @ self.wte.weight.t()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def learning_rate(it):
  if it < WARMUP:
    return LR * (it + 1) / (WARMUP + 1)
  ratio = min(1.0, (it - WARMUP) / (MAX_ITERS - WARMUP))
  return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main(path):
  start = time.perf_counter()
  torch.manual_seed(1337)
  text = open(path, encoding='utf-8').read()
  chars = sorted(set(text))
  ids = np.searchsorted(np.array(chars), np.array(list(text))).astype(np.uint16)
  split = int(0.9 * len(ids))
  data = {'train': ids[:split], 'val': ids[split:]}

  def get_batch(name):
    d = data[name]
    ix = torch.randint(len(d) - BLOCK, (BATCH,))
    x = torch.stack([torch.from_numpy(d[i:i + BLOCK].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
    return x, y

  model = GPT(len(chars))
  decay = [p for p in model.parameters() if p.dim() >= 2]
  no_decay = [p for p in model.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1},
                                 {'params': no_decay, 'weight_decay': 0.0}],
                                lr=LR, betas=(0.9, 0.99))

  @torch.no_grad()
  def estimate_loss():
    model.eval()
    out = {name: float(np.mean([model(*get_batch(name)).item() for _ in range(EVAL_ITERS)]))
           for name in ('train', 'val')}
    model.train()
    return out

  losses = {}
  for it in range(MAX_ITERS + 1):
    for group in optimizer.param_groups:
      group['lr'] = learning_rate(it)
    if it % EVAL_INTERVAL == 0:
      losses = estimate_loss()
      print(f'step {it}: train {losses["train"]:.4f}, val {losses["val"]:.4f}', flush=True)
    loss = model(*get_batch('train'))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    loss.item()
  print(f'final val loss {losses["val"]:.4f}; wall {time.perf_counter() - start:.1f} s '
        f'({torch.get_num_threads()} threads)')


if __name__ == '__main__':
  main(sys.argv[1])
