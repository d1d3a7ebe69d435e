"""dpnp_loss's epilogue in plain PyTorch: DPNP's loss (eq. 10) from the logits and the Gram matrix.

Rows 0..N-1 are the samples h_i (label y_i), rows N..N+M-1 the prototypes c_j. With s = h C^T,
G = C C^T and ||c||^2 = diag(G), each row finds its rival, the nearest prototype other than its
own (the lowest index among equal scores ||c_k||^2 - 2 s_k, the squared distance less the row's
own norm; none when M = 1), and contributes

    sample i:    CE_i / N + lambda_pos / 2N ||h_i - c_{y_i}||^2
                 - lambda_neg_sample / 2N half(h_i - c_r)
    prototype j: - lambda_neg_class / 2M half(c_j - c_r)

with half(v) = sum_d sqrt(|v_d| + eps) - sqrt(eps) (eq. 10's ||v||_{1/2}^{1/2} with a finite
gradient g(v) = sign(v) / (2 sqrt(|v| + eps))). The loss's gradients are linear in three buffers:

    grad_h = W C + own[:N]       with W = (softmax(s) - (1 + lambda_pos) onehot(y)) / N
    grad_C = W^T h + own[N:] + index_add(targets, scatter)
    own:     sample i: lambda_pos / N h_i - lambda_neg_sample / 2N g(h_i - c_r)
             prototype j: -lambda_neg_class / 2M g(c_j - c_r)
    scatter: rows 0..N+M-1: the same rows' rival terms (+ the g term, target r);
             rows N+M..2N+M-1: lambda_pos / N c_{y_i} (target y_i)

(the positive term's -h_i part and the cross-entropy's are both in W). The same formulas as
triton_kernels/dpnp_loss.py and csrc/dpnp_loss.cu.
"""
from __future__ import annotations

import math

import torch


def _rivals(scores: torch.Tensor, sq_norms: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Each row's lowest-index minimum of sq_norms - 2 scores over the columns other than `own`
    (NaN never wins; a row of no finite candidate takes its first allowed column)."""
    rows, m = scores.shape
    cols = torch.arange(m, device=scores.device)
    key = sq_norms[None] - 2 * scores
    allowed = cols[None] != own[:, None]
    key = torch.where(allowed & ~key.isnan(), key, math.inf)
    best = key.min(1, keepdim=True).values
    first_allowed = torch.where(own == 0, 1, 0)
    chosen = torch.where((key == best) & allowed & (best < math.inf), cols, m).min(1).values
    return torch.where(chosen < m, chosen, first_allowed) % max(m, 1)


def _half(v: torch.Tensor, eps: float):
    """(half(v) per row, g(v))."""
    root = torch.sqrt(v.abs() + eps)
    return (root - math.sqrt(eps)).sum(-1), torch.sign(v) / (2 * root)


def dpnp_epilogue(scores: torch.Tensor, gram: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
                  labels: torch.Tensor, lambda_pos: float, lambda_neg_sample: float,
                  lambda_neg_class: float, eps: float):
    """scores (N, M) = h c^T, gram (M, M) = c c^T, h (N, D), c (M >= 1, D) in the accumulate
    dtype, labels int64 (N,) in [0, M) -> (loss, own (N + M, D), scatter (2N + M, D), targets
    (2N + M,)); scores is overwritten with W (N, M)."""
    n, m = scores.shape
    wn = 1 / max(n, 1)
    sq_norms = gram.diagonal()
    rows = torch.arange(m, device=c.device)
    rival = _rivals(scores, sq_norms, labels)
    neighbour = _rivals(gram, sq_norms, rows)
    lse = torch.logsumexp(scores, 1)
    cross_entropy = lse - scores.gather(1, labels[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(labels, m).to(scores.dtype)
    weights = (torch.exp(scores - lse[:, None]) - (1 + lambda_pos) * onehot) * wn
    has_rival = float(m > 1)
    positive = c[labels]
    half_h, g_h = _half(h - c[rival], eps)
    half_c, g_c = _half(c - c[neighbour], eps)
    neg_sample = lambda_neg_sample * wn / 2 * has_rival
    neg_class = lambda_neg_class / (2 * m) * has_rival
    loss = ((cross_entropy * wn + lambda_pos * wn / 2 * (h - positive).square().sum(-1)
             - neg_sample * half_h).sum() - (neg_class * half_c).sum())
    own = torch.cat([lambda_pos * wn * h - neg_sample * g_h, -neg_class * g_c])
    scatter = torch.cat([neg_sample * g_h, neg_class * g_c, lambda_pos * wn * positive])
    targets = torch.cat([rival, neighbour, labels])
    scores.copy_(weights)
    return loss, own, scatter, targets
