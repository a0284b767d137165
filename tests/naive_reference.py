"""Naive NumPy references of docs/SPECIFICATION.md §1, written for clarity, not speed."""

import numpy as np


def brute_force_relative_logits(q, rel_h, rel_w):
  """Loop over every (query, key) pair: docs/SPECIFICATION.md §1, key minus query offsets."""
  batch, heads, height, width, _ = q.shape
  out = np.zeros((batch, heads, height * width, height * width), np.float64)
  for y in range(height):
    for x in range(width):
      for y2 in range(height):
        for x2 in range(width):
          query = q[:, :, y, x]
          out[:, :, y * width + x, y2 * width + x2] = (
              query @ rel_w[x2 - x + width - 1] + query @ rel_h[y2 - y + height - 1])
  return out


def naive_attention(q, k, v, rel_h=None, rel_w=None):
  """softmax(QKᵀ + S_H + S_W) V per head in float64 NumPy; q is already scaled."""
  batch, heads, height, width, depth = q.shape
  flat = lambda t: t.reshape(batch, heads, height * width, -1).astype(np.float64)
  logits = np.einsum("bnqd,bnkd->bnqk", flat(q), flat(k))
  if rel_h is not None:
    logits = logits + brute_force_relative_logits(q.astype(np.float64), rel_h, rel_w)
  logits = logits - logits.max(-1, keepdims=True)
  weights = np.exp(logits)
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bnqk,bnkd->bnqd", weights, flat(v))
  return out.reshape(batch, heads, height, width, -1), weights


def conv2d_same(x, kernel):
  """Stride-1 SAME convolution by explicit taps. x [B, H, W, C], kernel [kh, kw, C, F]."""
  kh, kw = kernel.shape[:2]
  padded = np.pad(x, [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)])
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for dy in range(kh):
    for dx in range(kw):
      patch = padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
      out += patch @ kernel[dy, dx]
  return out


def naive_aaconv(x, params, key_depth, value_depth, num_heads):
  """AAConv of docs/SPECIFICATION.md §1 (stride 1, relative logits), one query pixel at a time.

  x [B, H, W, C_in]; params as created by ``aa_flax.layers.AAConv``. Returns
  [B, H, W, F_out] = concat[conv(X), W^O MHA(X)].
  """
  x = x.astype(np.float64)
  batch, height, width, _ = x.shape
  p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else
           {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in params.items()}
  qkv = x @ p["qkv"]["kernel"][0, 0] + p["qkv"]["bias"]
  q, k, v = qkv[..., :key_depth], qkv[..., key_depth:2 * key_depth], qkv[..., 2 * key_depth:]
  dkh, dvh = key_depth // num_heads, value_depth // num_heads
  rel_h, rel_w = p["rel_height"], p["rel_width"]
  heads_out = np.zeros((batch, height, width, value_depth))
  for n in range(num_heads):
    qn = q[..., n * dkh:(n + 1) * dkh] * dkh ** -0.5
    kn = k[..., n * dkh:(n + 1) * dkh]
    vn = v[..., n * dvh:(n + 1) * dvh]
    for b in range(batch):
      for y in range(height):
        for xq in range(width):
          logits = np.zeros((height, width))
          for y2 in range(height):
            for x2 in range(width):
              logits[y2, x2] = qn[b, y, xq] @ (kn[b, y2, x2] + rel_w[x2 - xq + width - 1]
                                                + rel_h[y2 - y + height - 1])
          w = np.exp(logits - logits.max())
          w /= w.sum()
          heads_out[b, y, xq, n * dvh:(n + 1) * dvh] = np.einsum("hw,hwd->d", w, vn[b])
  attn = heads_out @ p["attention_output"]["kernel"][0, 0] + p["attention_output"]["bias"]
  parts = [attn]
  if "conv" in p:
    parts.insert(0, conv2d_same(x, p["conv"]["kernel"]))
  return np.concatenate(parts, axis=-1)
