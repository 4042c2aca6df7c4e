"""
DTP-ViT: a Vision Transformer with Dynamic Token Pooling, in one file.

    image -> conv patch embedding -> [CLS] + N patch tokens + position embedding -> ln_pre
      -> pre_layers full-length blocks                                    1 + N tokens
      -> patches in scan order (raster, or a Hilbert curve so that segments are 2D regions)
      -> boundary predictor: a logit per patch token -> 0/1 boundaries (b_t = 1 closes a segment)
      -> each segment of patches is mean-pooled into one token             1 + S tokens, S ~ N / compression
      -> short_layers blocks on [CLS] + segments (padded per batch, padding masked)
      -> ln_post -> [CLS] token (or masked mean of the segments) -> proj   -> image embedding

Dynamic Token Pooling comes from Nawrot et al., "Efficient Transformers with Dynamic Token
Pooling" (ACL 2023). Parameter names follow OpenCLIP's VisionTransformer, so an OpenCLIP
checkpoint loads key for key (the boundary predictor is the only new module); the text tower
and tokenizer are OpenCLIP's own. docs/method.md describes the algorithm and the mistakes of the
original research code that the comments below refer to.
"""
import difflib
import math
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Optional

import open_clip
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import _build_text_tower, convert_to_custom_text_state_dict, resize_pos_embed
from open_clip.transformer import QuickGELU


@dataclass
class DTPConfig:
    # the ViT; the defaults are OpenCLIP's ViT-B-32 image tower
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    pre_layers: int = 2            # full-length blocks before pooling
    short_layers: int = 10         # blocks that run on the pooled, shorter sequence
    embed_dim: int = 512           # output embedding (CLIP's joint image-text space)
    quick_gelu: bool = False       # OpenAI's original CLIP weights were trained with QuickGELU
    emb_dropout: float = 0.0       # dropout on the patch + position embeddings
    # dynamic token pooling
    boundary: str = 'gumbel'       # 'gumbel' (learned), 'fixed' (evenly spaced), 'cosine' (no weights: cut
                                   # where neighbouring patches' features differ most), 'color' (cut where
                                   # their mean colour does) or 'none' (plain ViT)
    compression: float = 4.0       # target patches per segment; the boundary prior is 1 / compression
    temperature: float = 0.5       # Gumbel-Sigmoid temperature (it only scales the gradient, see below)
    train_boundaries: str = 'bernoulli'  # training samples: 'bernoulli' (the paper: each patch on its own),
                                   # 'topk' (Gumbel-top-k: exactly the count evaluation takes) or
                                   # 'reinforce' (top-k samples; the predictor learns by REINFORCE)
    position_prior: float = 0.0    # > 0: a learned per-position logit bias, initialised to +-this at the
                                   # evenly spaced boundaries, so the predictor starts as fixed pooling
    color_prior: float = 0.0       # > 0: add the colour change between neighbouring patches (z-scored per
                                   # image) times a learned gain, initialised to this, to the predictor's
                                   # logits, so it starts near the 'color' rule's cuts and learns from there
    detach_predictor_input: bool = False  # True: the predictor reads the pre-layer tokens without sending
                                   # its straight-through gradient back into them (the backbone learns
                                   # from the task only)
    reinforce_baseline: str = 'batch'  # REINFORCE's baseline: 'batch' (an image's loss against the batch's
                                   # mean) or 'greedy' (against the loss of the image's own top-k cuts,
                                   # scored by a second, gradient-free pass of the layers after pooling)
    train_on_greedy: bool = False  # True (with reinforce_baseline='greedy'): the layers after pooling train on
                                   # the top-k cuts evaluation takes; the sampled cuts are only scored, for
                                   # the router's reward, so the backbone never learns on exploration's cuts
    min_segment: int = 1           # > 1 (with train_boundaries='reinforce'): the predictor's segments hold at least
                                   # this many patches, in its samples and in the cuts evaluation takes
    boundary_noise: float = 1.0    # scale of the noise in training's samples (0: deterministic, training
                                   # takes the boundaries evaluation takes)
    size_attention: bool = False   # True: log(patches in the segment) is added to the attention logits of
                                   # each pooled token, so a segment of 8 patches weighs as 8 copies of one
    eval_boundaries: str = 'topk'  # eval: 'topk' (round(N / compression) per image) or 'threshold' (p > 0.5)
    scan: str = 'raster'           # order of the patches that segments are runs of: 'raster' or 'hilbert'
    predictor_hidden: Optional[int] = None  # hidden size of the boundary predictor (None: width)
    predictor_pairs: bool = False  # True: the predictor reads each patch's features with their change to the
                                   # next patch's (in scan order), so it can learn to cut where the features
                                   # change; otherwise it sees one patch (and what attention mixed into it)
    pool: str = 'cls'              # image embedding: the 'cls' token or the 'mean' of the segments
    extent_embedding: bool = False # True: add a learned embedding of each segment's first and of its last
                                   # patch to its pooled token (where it lies and how long it is, which the
                                   # mean of its patches blurs); zero at initialisation

    def __post_init__(self):
        choices = dict(boundary=('gumbel', 'fixed', 'cosine', 'color', 'none'),
                       eval_boundaries=('topk', 'threshold'), pool=('cls', 'mean'), scan=('raster', 'hilbert'),
                       train_boundaries=('bernoulli', 'topk', 'reinforce'), reinforce_baseline=('batch', 'greedy'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DTPConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.pre_layers < 0 or self.short_layers < 0:
            raise ValueError(f"DTPConfig: pre_layers={self.pre_layers}, short_layers={self.short_layers} must be >= 0")
        if not self.compression >= 1:
            raise ValueError(f"DTPConfig.compression={self.compression}: patches per segment must be >= 1")
        if not self.temperature > 0:  # Gumbel-Sigmoid divides by it: 0 gives NaN, < 0 inverts the boundaries
            raise ValueError(f"DTPConfig.temperature={self.temperature}: must be > 0")
        if not self.boundary_noise >= 0:
            raise ValueError(f"DTPConfig.boundary_noise={self.boundary_noise}: must be >= 0 (0: no noise)")
        if self.train_boundaries == 'reinforce' and not self.boundary_noise > 0:
            raise ValueError("DTPConfig.train_boundaries='reinforce' needs boundary_noise > 0: REINFORCE learns from "
                             "the samples' differences, and without noise every sample is the same")
        if self.reinforce_baseline != 'batch' and self.train_boundaries != 'reinforce':
            raise ValueError(f"DTPConfig.reinforce_baseline={self.reinforce_baseline!r} needs "
                             f"train_boundaries='reinforce' (it is the baseline of REINFORCE's reward)")
        if self.train_on_greedy and self.reinforce_baseline != 'greedy':
            raise ValueError("DTPConfig.train_on_greedy=True needs reinforce_baseline='greedy' (the top-k cuts' pass "
                             "is the one it trains on)")
        if self.min_segment != 1:
            if self.boundary != 'gumbel' or self.train_boundaries != 'reinforce':
                raise ValueError(f"DTPConfig.min_segment={self.min_segment} needs boundary='gumbel' and "
                                 f"train_boundaries='reinforce' (its cuts are drawn one after another)")
            if self.eval_boundaries != 'topk':  # p > 0.5 cuts wherever it likes: the minimum would hold in training only
                raise ValueError(f"DTPConfig.min_segment={self.min_segment} needs eval_boundaries='topk' (threshold "
                                 f"evaluation cannot keep the minimum)")
            # each cut rules out at most 2 * min_segment - 1 of the N - 2 * min_segment + 1 patches a cut may take
            n, k, m = self.n_patches, self.n_segments, self.min_segment
            if m < 1:
                raise ValueError(f"DTPConfig.min_segment={m}: must be >= 1 (1: no minimum)")
            if n - 2 * m < (k - 2) * (2 * m - 1):
                raise ValueError(f"DTPConfig.min_segment={m}: {k} segments of {n} patches cannot all be sure to get "
                                 f"{m} or more; use a smaller min_segment or a higher compression")
        if not self.color_prior >= 0:
            raise ValueError(f"DTPConfig.color_prior={self.color_prior}: must be >= 0 (0: no colour prior)")
        if self.color_prior > 0 and self.boundary != 'gumbel':
            raise ValueError(f"DTPConfig.color_prior={self.color_prior} needs boundary='gumbel' (it is added to the "
                             f"predictor's logits; boundary='color' is the same cuts without weights)")
        if not self.position_prior >= 0:
            raise ValueError(f"DTPConfig.position_prior={self.position_prior}: must be >= 0 (0: no position prior)")
        if self.predictor_pairs and self.boundary != 'gumbel':
            raise ValueError(f"DTPConfig.predictor_pairs=True needs boundary='gumbel' (the learned predictor's input; "
                             f"boundary={self.boundary!r} has no predictor)")
        if self.extent_embedding and self.boundary == 'none':
            raise ValueError("DTPConfig.extent_embedding=True needs pooling: the plain ViT (boundary='none') "
                             "has no segments")
        if self.width % self.heads:
            raise ValueError(f"DTPConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"DTPConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_segments(self):
        """Segments per image at this compression: N / compression rounded half up, at least 1. The
        one rule for fixed pooling, top-k evaluation, top-k training and flops.py's tables."""
        return min(self.n_patches, max(1, math.floor(self.n_patches / self.compression + 0.5)))


# ----------------------------------------------------------------------------------------------
# Scan order. A segment is a run of consecutive patches, so the order in which the patches are
# read decides which shapes a segment can take. In raster order (row by row) every segment is a
# horizontal strip that wraps from the end of one row to the start of the next: a compact object
# can never be one segment. Along a Hilbert curve every run of consecutive patches is a connected
# 2D region, and runs of 4 are mostly 2x2 blocks.

def gilbert_order(h, w):
    """Row-major indices of the cells of an h x w grid, in the order of a generalised Hilbert curve
    (Cerveny's "gilbert" construction, which works on any rectangle). Consecutive cells are grid
    neighbours, except for one diagonal step when the long side is odd and the short side even: a
    path from a corner to the adjacent corner of such a grid cannot exist (parity)."""
    def sign(v):
        return (v > 0) - (v < 0)

    def walk(x, y, ax, ay, bx, by):
        # Cover the rectangle spanned from (x, y) by a major axis (ax, ay) and a minor axis
        # (bx, by), entering at (x, y) and leaving at the far end of the major axis.
        w, h = abs(ax + ay), abs(bx + by)
        dax, day, dbx, dby = sign(ax), sign(ay), sign(bx), sign(by)
        if h == 1 or w == 1:  # a single row or column: straight along it
            dx, dy, n = (dax, day, w) if h == 1 else (dbx, dby, h)
            for i in range(n):
                yield x + i * dx, y + i * dy
            return
        ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
        if 2 * w > 3 * h:  # long and thin: cut across the major axis, walk the two halves
            if abs(ax2 + ay2) % 2 and w > 2:  # an even first half keeps the exit at the far end
                ax2, ay2 = ax2 + dax, ay2 + day
            yield from walk(x, y, ax2, ay2, bx, by)
            yield from walk(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
        else:  # up the first half of the minor axis, along the far side, back down
            if abs(bx2 + by2) % 2 and h > 2:
                bx2, by2 = bx2 + dbx, by2 + dby
            yield from walk(x, y, bx2, by2, ax2, ay2)
            yield from walk(x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
            yield from walk(x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby),
                            -bx2, -by2, -(ax - ax2), -(ay - ay2))

    path = walk(0, 0, w, 0, 0, h) if w >= h else walk(0, 0, 0, h, w, 0)
    return [y * w + x for x, y in path]


def scan_order(scan, h, w):
    """(N,) long tensor: scan_order[i] is the row-major index of the i-th patch in scan order."""
    return torch.tensor(gilbert_order(h, w) if scan == 'hilbert' else range(h * w), dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Transformer block, with the parameter names of OpenCLIP's ResidualAttentionBlock

class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_weight,
    in_proj_bias, out_proj), computed by F.scaled_dot_product_attention, which takes the padding
    mask of the pooled sequence and runs fused kernels on CPU and GPU alike. With `packing` (see
    Packing below) x holds only the real tokens, and the padded layout exists only in here."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention initialises them
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, packing=None, attn_bias=None):
        """x: (B, L, D), or (T, D) real tokens when packed. attn_bias: None, or (B, 1, 1, L) added to
        the attention logits of each key (-inf at the padding)."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        mask = attn_bias  # the size bias already holds -inf at the padding; else the padding mask
        if packing is not None:
            qkv = packing.unpack(qkv)
            if mask is None:
                mask = packing.attn_mask
        B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if mask is not None and mask.dtype != torch.bool:  # a float bias must match q's dtype (autocast)
            mask = mask.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, D)
        if packing is not None:
            x = packing.pack(x)
        return self.out_proj(x)


class Block(nn.Module):
    def __init__(self, width, heads, mlp_ratio, act_layer):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden), gelu=act_layer(), c_proj=nn.Linear(hidden, width)))

    def forward(self, x, packing=None, attn_bias=None):
        x = x + self.attn(self.ln_1(x), packing, attn_bias)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------
# Boundaries. b is (B, N) over the patch tokens, b_t = 1 where patch t is the LAST of its segment.
# Every function returns exact 0/1 values; only the Gumbel one also carries a gradient.

def gumbel_sigmoid(logits, temperature, noise=1.0, eps=1e-6):
    """Hard Bernoulli(sigmoid(logits)) samples with the Gumbel-Sigmoid straight-through gradient.
    noise scales the logistic noise: 0 gives the deterministic boundaries logits > 0."""
    u = torch.rand_like(logits).clamp(eps, 1 - eps)  # clamped: log(0) would be -inf
    soft = torch.sigmoid((logits + noise * (torch.log(u) - torch.log1p(-u))) / temperature)
    # soft > 0.5 iff logits + logistic noise > 0: an exact Bernoulli draw whatever the temperature,
    # which only sharpens the gradient. Straight-through: the value of `hard`, the gradient of `soft`.
    hard = (soft > 0.5).float()
    return hard + (soft - soft.detach())


def gumbel_topk(logits, k, temperature, noise=1.0, eps=1e-6):
    """Exactly k boundaries per image (the last patch one of them), sampled without replacement in
    proportion to softmax(logits) by perturbing the logits with Gumbel noise and keeping the k
    largest, as top-k evaluation keeps k: training sees the segment counts evaluation runs.
    Straight-through gradient of a sigmoid around the threshold between the k-th and (k+1)-th.
    noise scales the Gumbel noise: 0 keeps the k largest logits, as evaluation does."""
    N = logits.shape[1]
    if k >= N:
        return torch.ones_like(logits)
    u = torch.rand_like(logits).clamp(eps, 1 - eps)
    perturbed = logits - noise * torch.log(-torch.log(u))
    forced = torch.cat([perturbed[:, :-1], torch.full_like(perturbed[:, -1:], float('inf'))], dim=1)
    top = forced.topk(k + 1, dim=1)
    hard = torch.zeros_like(logits).scatter_(1, top.indices[:, :k], 1.0)
    threshold = (top.values[:, k - 1:k] + top.values[:, k:]).detach() / 2  # finite: k < N
    soft = torch.sigmoid((perturbed - threshold) / temperature)
    return hard + (soft - soft.detach())


def sampled_topk(logits, k, noise=1.0, eps=1e-6):
    """REINFORCE's sampler: k boundaries per image (the last patch one of them), drawn as gumbel_topk
    draws them but hard, without a gradient, and the log-probability of the draw, (B,). Keeping the
    k - 1 largest of logits / noise + Gumbel noise draws k - 1 patches one after another, each from a
    softmax over the patches not drawn yet (Plackett-Luce), so the draw's log-probability, in its
    order, is the sum of those k - 1 log-softmaxes: what REINFORCE differentiates."""
    B, N = logits.shape
    if k >= N:
        return torch.ones_like(logits), logits.new_zeros(B)
    scores = logits[:, :-1] / noise  # the last patch is a boundary anyway: not drawn
    u = torch.rand_like(scores).clamp(eps, 1 - eps)
    order = (scores.detach() - torch.log(-torch.log(u))).argsort(dim=1, descending=True)
    ranked = scores.gather(1, order)
    remaining = torch.logcumsumexp(ranked.flip(1), dim=1).flip(1)  # logsumexp of those not drawn before
    log_prob = (ranked - remaining)[:, :k - 1].sum(dim=1)
    hard = torch.ones_like(logits)
    hard[:, :-1] = torch.zeros_like(scores).scatter_(1, order[:, :k - 1], 1.0)
    return hard, log_prob


def topk_boundaries(logits, k):
    """Exactly k boundaries per image at the most probable positions (the last patch is one of them)."""
    logits = torch.cat([logits[:, :-1], torch.full_like(logits[:, -1:], float('inf'))], dim=1)
    return torch.zeros_like(logits).scatter_(1, logits.topk(k, dim=1).indices, 1.0)


def spaced_cuts(logits, k, min_len, noise=None, eps=1e-6):
    """k boundaries (the last patch one of them) that leave every segment at least min_len patches, and the
    log-probability of the draw, (B,). The k - 1 cuts come one after another, each at a patch still allowed
    (at least min_len from the cuts before it and from both ends): drawn from a softmax over those patches'
    logits / noise (a Gumbel-max draw), or, without noise, the largest of those logits, as evaluation takes
    them. With min_len = 1 this is top-k (noise None) and Plackett-Luce's draws, as sampled_topk. A draw's
    log-probability is the sum of its k - 1 log-softmaxes, what REINFORCE differentiates."""
    B, N = logits.shape
    scores = logits[:, :-1] / (noise or 1.0)  # the last patch is a boundary anyway
    t = torch.arange(N - 1, device=logits.device)
    allowed = ((t >= min_len - 1) & (t <= N - 1 - min_len)).expand(B, N - 1).clone()
    hard, log_prob = torch.zeros_like(logits), logits.new_zeros(B)
    for _ in range(k - 1):
        masked = scores.masked_fill(~allowed, float('-inf'))
        pick = masked.detach()
        if noise is not None:
            u = torch.rand_like(pick).clamp(eps, 1 - eps)
            pick = pick - torch.log(-torch.log(u))
        pick = pick.argmax(dim=1, keepdim=True)                     # (B, 1)
        log_prob = log_prob + masked.log_softmax(dim=1).gather(1, pick).squeeze(1)
        hard[:, :-1].scatter_(1, pick, 1.0)
        allowed &= (t - pick).abs() >= min_len                      # the patches too close to this cut
    hard[:, -1] = 1.0
    return hard, log_prob


def fixed_boundaries(batch, n, n_segments, device=None):
    """Evenly spaced boundaries cutting n patches into exactly n_segments segments."""
    seg = torch.arange(n, device=device) * n_segments // n  # segment id of each patch: 0 .. n_segments-1
    b = torch.ones(n, device=device)
    b[:-1] = (seg[1:] != seg[:-1]).float()
    return b.expand(batch, n)


def boundary_prior_loss(b, prior):
    """-log Binomial(k = sum_t b_t; n = N, p = prior) / N, averaged over the batch. It is computed on
    the straight-through boundaries, so the count k carries a gradient (lgamma is smooth in k);
    a loss on round(sum(soft)) would have none."""
    n, k = b.shape[1], b.sum(dim=1)
    p = min(max(prior, 1e-6), 1 - 1e-6)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))
    return (-log_pmf / n).mean()


def segment_ids(b):
    """Segment index of every patch: the number of boundaries strictly before it."""
    return b.cumsum(dim=1) - b


def pool_segments(x, b, count=None):
    """Mean-pool each segment of x (B, N, D) cut by the boundaries b (B, N).

    Returns the segments (B, S, D), padded with zeros to the largest segment count S in the batch,
    `real` (B, S), True on real segments, or None when no image needed padding, and the sizes (B, S):
    patches per segment (0 at the padding), which carry b's gradient as the pooling weights do.
    count: every image's segment count, where the caller knows it (top-k and evenly spaced cuts).
    Otherwise the batch's largest count is read from b, which makes the host wait for the GPU: the
    CPU can no longer queue kernels ahead, and on a fast GPU the rest of the forward is then bound by
    how fast Python launches them (on an H200 that ate most of the speedup, see the README).
    """
    n_segments = b.detach().sum(dim=1)  # exact: the last patch of every image closes a segment
    if count is None:
        lo, hi = (int(v) for v in torch.stack([n_segments.min(), n_segments.max()]).tolist())  # one host sync
    else:
        torch._assert_async(n_segments.eq(count).all(), 'pool_segments: a segment count is not the one given')
        lo = hi = count
    # Segment id of each patch: the number of boundaries strictly before it. It is a whole number in
    # value but carries b's gradient.
    seg = segment_ids(b)
    dist = torch.arange(hi, device=x.device, dtype=b.dtype) - seg.unsqueeze(-1)  # (B, N, S)
    # The DTP paper's trick: weight 1 - dist where dist == 0 (patch t lies in segment s), else 0.
    # In value that is the 0/1 membership; in gradient d weight / d seg = 1, so the task loss reaches
    # the predictor through the pooling. (Comparing ids with == alone sends it no gradient at all.)
    w = torch.where(dist.detach() == 0, 1 - dist, torch.zeros_like(dist))
    sizes = w.sum(dim=1)
    w = w / sizes.unsqueeze(1).clamp(min=1)  # mean over each segment's patches; padding stays 0
    pooled = torch.einsum('bns,bnd->bsd', w.to(x.dtype), x)
    real = None if lo == hi else torch.arange(hi, device=x.device) < n_segments.unsqueeze(1)
    return pooled, real, sizes


def pooling_distortion(x, b, pooled):
    """(B,): the share of the patches' variance (about their image's mean) that replacing each patch of
    x (B, N, D) by the mean of its segment (pooled, from pool_segments over the cuts b) throws away: 0
    when the patches of every segment are alike, 1 when every segment's mean is the image's mean. A
    reading, without gradient: REINFORCE can add it to a sample's cost, to pay for segments that their
    mean token describes well (see distortion_weight in the training scripts)."""
    x, pooled = x.detach().float(), pooled.detach().float()
    seg = segment_ids(b.detach()).long().unsqueeze(-1).expand_as(x)
    lost = (x - pooled.gather(1, seg)).square().sum(dim=(1, 2))
    return lost / (x - x.mean(dim=1, keepdim=True)).square().sum(dim=(1, 2)).clamp(min=1e-6)


class Packing:
    """The real tokens of a padded batch, packed. Images keep different numbers of segments, so the
    pooled batch is padded to the largest. Padding must never be attended to (a key-padding mask),
    and need not be computed either: LayerNorms, projections and MLPs (nearly all the FLOPs) run on
    the T real tokens packed as (T, D), and only attention sees the (B, L) layout. Padding every
    image to the longest cost 20-25% of a training step with sampled segment counts."""

    def __init__(self, real):
        self.batch, self.length = real.shape                        # real: (B, L) bool
        self.index = real.flatten().nonzero().squeeze(1)            # flat positions of the real tokens
        self.attn_mask = real[:, None, None, :]                     # (B, 1, 1, L): attend to real keys only

    def pack(self, x):
        """(B, L, C) -> (T, C), the real tokens."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, tokens):
        """(T, C) -> (B, L, C), zeros at the padding."""
        out = tokens.new_zeros(self.batch * self.length, tokens.shape[-1])
        return out.index_copy(0, self.index, tokens).view(self.batch, self.length, -1)


def float32_call(module, x):
    """module(x) computed in float32, also in a model cast to half precision (.half(), .to(torch.bfloat16)):
    then its weights are upcast for the call, and gradients still reach them. float32 weights are used as
    they are (a plain call, which also keeps fvcore's traced graph attributing the FLOPs to the module)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module(x.float())
    weights = {name: p.float() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, weights, (x.float(),))


# ----------------------------------------------------------------------------------------------

class DTPViT(nn.Module):
    def __init__(self, cfg: DTPConfig):
        super().__init__()
        self.cfg = cfg
        width, scale = cfg.width, cfg.width ** -0.5
        self.grid_size = (cfg.image_size // cfg.patch_size,) * 2  # OpenCLIP's resize_pos_embed reads it
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, cfg.patch_size, bias=False)  # no bias, as OpenCLIP
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.n_patches + 1, width))
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.ln_pre = nn.LayerNorm(width)
        act_layer = QuickGELU if cfg.quick_gelu else nn.GELU
        # One list of blocks, named as in OpenCLIP (transformer.resblocks.i); forward() splits it.
        self.transformer = nn.ModuleDict(dict(resblocks=nn.ModuleList(
            Block(width, cfg.heads, cfg.mlp_ratio, act_layer) for _ in range(cfg.pre_layers + cfg.short_layers))))
        if cfg.boundary == 'gumbel':
            hidden, reads = cfg.predictor_hidden or width, 2 * width if cfg.predictor_pairs else width
            self.predictor = nn.Sequential(nn.LayerNorm(reads), nn.Linear(reads, hidden), nn.GELU(),
                                           nn.Linear(hidden, 1))
            # Start at the target rate: N / compression boundaries per image, one of which is the
            # last patch's (always a boundary), so the other N - 1 patches get the rest.
            N = cfg.n_patches
            p = min(max((N / cfg.compression - 1) / max(N - 1, 1), 1e-6), 1 - 1e-6)
            nn.init.constant_(self.predictor[-1].bias, math.log(p / (1 - p)))
            if cfg.train_boundaries == 'reinforce':  # start exactly at the position prior (or uniform draws)
                nn.init.zeros_(self.predictor[-1].weight)
            if cfg.position_prior > 0:
                # Where boundaries sit when the content says nothing: at first, fixed pooling's
                # evenly spaced ones. Kept under predictor.* (the predictor's new weights), added to
                # its logits in predict_boundaries.
                fixed = fixed_boundaries(1, N, cfg.n_segments)[0]
                self.predictor.register_parameter('position_bias', nn.Parameter(cfg.position_prior * (2 * fixed - 1)))
            if cfg.color_prior > 0:  # where the pixels change colour, at first (one learned gain)
                self.predictor.register_parameter('color_gain', nn.Parameter(torch.tensor(cfg.color_prior)))
        if cfg.extent_embedding:
            # Row i: added to the pooled token of a segment that starts (ends) at patch i of the scan.
            # Zero at first, so a model loaded from OpenCLIP weights computes what it did without them.
            self.extent_embedding = nn.ParameterDict(dict(start=nn.Parameter(torch.zeros(cfg.n_patches, width)),
                                                          end=nn.Parameter(torch.zeros(cfg.n_patches, width))))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))
        # Patches are segmented in this order (computed once; not part of the state dict).
        order = scan_order(cfg.scan, *self.grid_size)
        self.register_buffer('scan_order', order, persistent=False)
        self.register_buffer('raster_order', order.argsort(), persistent=False)  # its inverse

    def predict_boundaries(self, patches, images=None):
        """(B, N) 0/1 boundaries for the patch tokens after the pre-layers (in scan order), by the
        configured rule, the predictor's (B, N) logits (None for the rules without a predictor) and,
        training with REINFORCE, the (B,) log-probability of the sampled boundaries (else None)."""
        cfg = self.cfg
        B, N, _ = patches.shape
        if cfg.boundary == 'fixed':
            return fixed_boundaries(B, N, cfg.n_segments, patches.device), None, None
        if cfg.boundary == 'color':
            # Cuts from the pixels, not the features: close a segment after patch t where the mean
            # colour of patch t + 1 differs most from its own (Euclidean, in the normalised input).
            # The segments of an image then stay the same through the whole run, while the features a
            # 'cosine' cut reads change as the tower learns.
            return topk_boundaries(self.color_change(images), cfg.n_segments), None, None
        if cfg.boundary == 'cosine':
            # A router without weights (H-Net's cosine router with identity projections): close a
            # segment after patch t where patch t + 1 looks least like it (cosine of their features),
            # at the n_segments largest changes. It needs no training, so it can shorten a trained
            # plain ViT as it is; in training it is deterministic and sends no gradient.
            h = F.normalize(patches.detach().float(), dim=-1)
            change = 1 - (h[:, :-1] * h[:, 1:]).sum(dim=-1)        # (B, N - 1), in [0, 2]
            return topk_boundaries(F.pad(change, (0, 1)), cfg.n_segments), None, None
        # float32 even under autocast: in fp16 the relaxed-Bernoulli probabilities became NaN.
        with torch.autocast(patches.device.type, enabled=False):
            # REINFORCE's gradient is the predictor's alone: the backbone learns from the task only
            detach = cfg.detach_predictor_input or cfg.train_boundaries == 'reinforce'
            reads = patches.detach() if detach else patches
            if cfg.predictor_pairs:
                # A cut lies between two patches: the predictor gets patch t and how far each feature moves
                # to patch t + 1, absolute so that its first linear layer can sum it into a distance (the
                # signed change put 42% of cuts in place after 100 steps of the unit test, against 89%);
                # zero at the last patch, which closes a segment anyway.
                reads = torch.cat([reads, F.pad((reads[:, 1:] - reads[:, :-1]).abs(), (0, 0, 0, 1))], dim=-1)
            logits = float32_call(self.predictor, reads).squeeze(-1)
            if cfg.position_prior > 0:
                logits = logits + self.predictor.position_bias.float()
            if cfg.color_prior > 0:  # z-scored, so that the gain alone says how much colour counts
                change = self.color_change(images)[:, :-1]
                change = (change - change.mean(1, keepdim=True)) / change.std(1, keepdim=True).clamp_min(1e-3)
                logits = logits + self.predictor.color_gain.float() * F.pad(change, (0, 1))
            if self.training and cfg.train_boundaries == 'reinforce':
                if cfg.min_segment > 1:
                    b, log_prob = spaced_cuts(logits, cfg.n_segments, cfg.min_segment, cfg.boundary_noise)
                else:
                    b, log_prob = sampled_topk(logits, cfg.n_segments, cfg.boundary_noise)
                return b, logits, log_prob
        if self.training:
            if cfg.train_boundaries == 'topk':
                return gumbel_topk(logits, cfg.n_segments, cfg.temperature, cfg.boundary_noise), logits, None
            return gumbel_sigmoid(logits, cfg.temperature, cfg.boundary_noise), logits, None
        # Eval is deterministic: no noise, so an image always gets the same segments.
        if cfg.eval_boundaries == 'topk':
            return self.best_cuts(logits), logits, None
        return (logits > 0).float(), logits, None

    def best_cuts(self, logits):
        """The cuts evaluation takes (and the self-critical baseline and train_on_greedy): the n_segments most
        probable boundaries, or with min_segment the most probable ones, one after another, that keep it."""
        if self.cfg.min_segment > 1:
            return spaced_cuts(logits, self.cfg.n_segments, self.cfg.min_segment)[0]
        return topk_boundaries(logits, self.cfg.n_segments)

    def color_change(self, images):
        """(B, N): how far the mean colour of the next patch in scan order is from this patch's
        (Euclidean, in the normalised input); 0 at the last patch, which closes a segment anyway."""
        rgb = F.avg_pool2d(images.float(), self.cfg.patch_size).flatten(2).transpose(1, 2)  # (B, N, 3)
        if self.cfg.scan != 'raster':
            rgb = rgb.index_select(1, self.scan_order)
        return F.pad((rgb[:, :-1] - rgb[:, 1:]).norm(dim=-1), (0, 1))

    def forward(self, images, boundaries=None):
        """images (B, 3, H, W) -> (features (B, embed_dim), aux).

        boundaries: optional (B, N) 0/1 tensor, in scan order, used instead of the predicted ones,
        e.g. to simulate a compression ratio (flops.py) or to give every patch its own segment
        (tests). The predictor still runs (and its logits are returned), so its cost stays in the graph.
        aux: boundary_loss (scalar), n_segments (B,), compression (patches per segment over the
        whole batch), segment_ids (B, N): the segment of every patch in row-major grid order;
        boundaries (B, N) and, when there is a predictor, boundary_logits (B, N), both in scan order
        (patch i of the scan is patch scan_order[i] of the grid); training with REINFORCE,
        boundary_log_prob (B,), the log-probability of each image's sampled boundaries, and with
        reinforce_baseline='greedy', greedy_features (B, embed_dim): the image with its top-k cuts; training
        with REINFORCE, pooling_distortion (B,) of the sampled cuts (and greedy_distortion, of the top-k cuts).
        With train_on_greedy the returned features (and boundaries) are the top-k cuts', and the sample's
        features, without gradient, are sample_features.
        """
        cfg = self.cfg
        if images.ndim != 4 or tuple(images.shape[-2:]) != (cfg.image_size, cfg.image_size):
            # the convolution would run on any size: larger images silently lose their right and bottom edges
            raise ValueError(f"DTPViT takes (B, 3, {cfg.image_size}, {cfg.image_size}) images, got "
                             f"{tuple(images.shape)}; resize them to {cfg.image_size} px (or build the model with "
                             f"that image_size)")
        x = self.embed(images)                                   # (B, 1 + N, D)
        for block in self.transformer.resblocks[:cfg.pre_layers]:
            x = block(x)
        features, aux = self.pool_and_finish(x, images, boundaries)
        if 'boundary_log_prob' in aux and cfg.reinforce_baseline == 'greedy':
            # A self-critical baseline: the same image with the cuts evaluation would take (the top-k
            # logits), through the layers after pooling, without a gradient. The training script
            # rewards the sample by how much better its loss came out than these features'.
            if cfg.train_on_greedy:  # the pass above took the top-k cuts (and trains); score the sample
                with torch.no_grad():
                    aux['sample_features'], sample_aux = self.pool_and_finish(x, images, aux.pop('sampled_boundaries'))
                aux['greedy_features'], aux['greedy_distortion'] = features.detach(), aux['pooling_distortion']
                aux['pooling_distortion'] = sample_aux['pooling_distortion']
                return features, aux
            greedy = self.best_cuts(aux['boundary_logits'].detach())
            with torch.no_grad():
                aux['greedy_features'], greedy_aux = self.pool_and_finish(x, images, greedy)
            aux['greedy_distortion'] = greedy_aux['pooling_distortion']
        return features, aux

    def pool_and_finish(self, x, images, boundaries=None):
        """The pre-layers' tokens (B, 1 + N, D) -> (features (B, embed_dim), aux): pooling, the short
        layers and the head."""
        x, packing, aux = self.segment(x, images, boundaries)    # (B, 1 + S, D), or (T, D) packed
        bias = self.size_bias(aux['segment_sizes'], packing) if self.cfg.size_attention else None
        for block in self.transformer.resblocks[self.cfg.pre_layers:]:
            x = block(x, packing, bias)
        return self.head(x, packing), aux

    def embed(self, images):
        """Patch embedding, [CLS] in front, position embedding, ln_pre: as OpenCLIP."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.emb_dropout(x))

    def segment(self, x, images, boundaries=None):
        """[CLS] + N patch tokens -> [CLS] + one token per segment, packed when the images' segment
        counts differ, and the aux dict of forward()."""
        cfg = self.cfg
        B, N = x.shape[0], x.shape[1] - 1
        distortion = None  # what the sampled cuts' segment means lose (REINFORCE training only)
        if cfg.boundary == 'none':
            b, logits, log_prob, packing = x.new_ones(B, N, dtype=torch.float32), None, None, None
            sizes = b
        else:
            patches = x[:, 1:]
            if cfg.scan != 'raster':  # segments are runs of consecutive patches in scan order
                patches = patches.index_select(1, self.scan_order)
            b, logits, log_prob = self.predict_boundaries(patches, images)
            if boundaries is not None:
                b, log_prob = boundaries.to(device=x.device, dtype=torch.float32), None
            elif log_prob is not None and cfg.train_on_greedy:  # keep the sample for forward() to score
                sampled, b = b, self.best_cuts(logits.detach())
            # The last patch always closes a segment, so no patch is ever left out of the pooling.
            b = torch.cat([b[:, :-1], b.new_ones(B, 1)], dim=1)
            # Every rule but the paper's Bernoulli samples (and threshold evaluation) cuts exactly
            # n_segments segments: then pooling need not read the count back from the GPU.
            exact = cfg.boundary != 'gumbel' or (cfg.train_boundaries in ('topk', 'reinforce') if self.training
                                                 else cfg.eval_boundaries == 'topk')
            segments, real, sizes = pool_segments(patches, b, cfg.n_segments if exact and boundaries is None else None)
            if self.training and cfg.train_boundaries == 'reinforce':
                distortion = pooling_distortion(patches, b, segments)
            if cfg.extent_embedding:
                segments = segments + self.extent(b.detach(), segments.shape[1]).to(segments.dtype)
            x = torch.cat([x[:, :1], segments], dim=1)  # [CLS] is never pooled
            packing = None
            if real is not None:  # segment counts differ: pack the real tokens ([CLS] is always real)
                packing = Packing(F.pad(real, (1, 0), value=True))
                x = packing.pack(x)

        n_segments = b.detach().sum(dim=1).long()
        prior = boundary_prior_loss(b, 1 / cfg.compression) if cfg.boundary == 'gumbel' else b.new_zeros(())
        # Segment of every patch in row-major grid order, whatever the scan order: what users,
        # pictures and segment-quality metrics read.
        seg = segment_ids(b.detach()).long()
        if cfg.scan != 'raster' and cfg.boundary != 'none':
            seg = seg.index_select(1, self.raster_order)
        aux = dict(boundary_loss=prior, n_segments=n_segments, boundaries=b.detach(), segment_ids=seg,
                   segment_sizes=sizes, compression=N / n_segments.float().mean())
        if logits is not None:
            aux['boundary_logits'] = logits
        if log_prob is not None:  # train_boundaries='reinforce': see reinforce_loss in train_utils.py
            aux['boundary_log_prob'] = log_prob
        if distortion is not None:  # REINFORCE may add it to the samples' cost (distortion_weight)
            aux['pooling_distortion'] = distortion
        if log_prob is not None and cfg.train_on_greedy:
            aux['sampled_boundaries'] = sampled
        return x, packing, aux

    def extent(self, b, n_segments):
        """(B, n_segments, D): each segment's start embedding (of its first patch) plus its end embedding
        (of its last patch, where b = 1); zero at the padding. Gathers and adds only: no FLOPs to count."""
        start = F.pad(b[:, :-1], (1, 0), value=1.0)  # a patch starts a segment if the one before closed one
        e = self.extent_embedding
        per_patch = start.unsqueeze(-1) * e['start'].float() + b.unsqueeze(-1) * e['end'].float()  # (B, N, D)
        seg = segment_ids(b).long().unsqueeze(-1).expand_as(per_patch)
        return per_patch.new_zeros(b.shape[0], n_segments, per_patch.shape[-1]).scatter_add_(1, seg, per_patch)

    def size_bias(self, sizes, packing):
        """Size-aware attention for the pooled tokens (as ToMe's proportional attention): a key that
        stands for s patches gets + log(s) on its attention logits, i.e. the weight of s copies of
        one token; [CLS] counts as one, padding gets -inf. (B, 1, 1, 1 + S), float32, carrying the
        sizes' gradient: how much weight a segment should get reaches the predictor too."""
        bias = torch.log(sizes.float().clamp(min=1e-6))
        if packing is not None:
            bias = bias.masked_fill(~packing.attn_mask[:, 0, 0, 1:], float('-inf'))
        return F.pad(bias, (1, 0), value=0.0)[:, None, None, :]

    def head(self, x, packing=None):
        """ln_post, then the [CLS] token (or the mean of the real segments), then proj."""
        if packing is not None:
            x = packing.unpack(x)
        if self.cfg.pool == 'cls':
            x = self.ln_post(x[:, 0])
        else:  # masked mean over the real segments (or all patches for the plain ViT)
            tokens = self.ln_post(x[:, 1:])
            if packing is None:
                x = tokens.mean(dim=1)
            else:
                real = packing.attn_mask[:, 0, 0, 1:].unsqueeze(-1)
                x = tokens.masked_fill(~real, 0).sum(1) / real.sum(1)
        return x @ self.proj


class CLIP(nn.Module):
    """A DTP-ViT image tower and OpenCLIP's own text tower, laid out as OpenCLIP's CustomTextCLIP
    (visual.*, text.*, logit_scale)."""

    def __init__(self, vision_cfg: DTPConfig, text_cfg):
        super().__init__()
        self.visual = DTPViT(vision_cfg)
        # text_cfg: a dict or open_clip.CLIPTextCfg, as in OpenCLIP's model configs
        self.text = _build_text_tower(vision_cfg.embed_dim, text_cfg, quick_gelu=vision_cfg.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images, normalize=False):
        features, _ = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, texts, normalize=False):
        features = self.text(texts)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images, texts):
        """Everything a training step needs in one call (DDP hooks into forward): normalized
        image_features and text_features, logit_scale (exponentiated), and the image tower's aux."""
        image_features, aux = self.visual(images)
        return dict(image_features=F.normalize(image_features, dim=-1),
                    text_features=self.encode_text(texts, normalize=True),
                    logit_scale=self.logit_scale.exp(), **aux)


# ----------------------------------------------------------------------------------------------
# OpenCLIP configs and checkpoints

# Vision-tower options of OpenCLIP configs that this ViT does not implement: a config that turns
# one on is refused rather than silently built without it.
_SUPPORTED_VISION_KEYS = {'image_size', 'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size', 'pool_type'}
_OFF_VALUES = (None, False, 0, 0.0, '', 'learnable', 'default', 'tok')


def _checkpoint_file(model_name, pretrained):
    if os.path.isfile(pretrained):
        return pretrained
    pretrained_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not pretrained_cfg:
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither a file nor an OpenCLIP tag of {model_name} "
            f"(its tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
    try:
        return open_clip.download_pretrained(pretrained_cfg)
    except Exception as e:
        raise RuntimeError(
            f"could not fetch OpenCLIP weights {model_name}/{pretrained} ({type(e).__name__}: {e}). "
            f"Without internet, download the checkpoint elsewhere and pass the local file: "
            f"load_openclip({model_name!r}, '/path/to/open_clip_pytorch_model.bin')") from e


# OpenAI's CLIP release stores these three hyperparameters as entries of the state dict; they are
# not weights (OpenCLIP's build_model_from_openai_state_dict drops them too).
_OPENAI_ENTRIES = ('input_resolution', 'context_length', 'vocab_size')


def _is_torchscript(path):
    """A TorchScript archive is a zip with a constants.pkl record (torch.jit.save's layout)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split('/', 1)[-1] == 'constants.pkl' for name in archive.namelist())


def read_checkpoint(path):
    """What a checkpoint file holds, on the CPU: a torch.save'd object (read with weights_only=True),
    a .safetensors file, or a TorchScript archive (OpenAI's CLIP weights), read as its state dict.
    A file none of these can read (empty, truncated, random bytes, text) is a ValueError naming it."""
    path = str(path)
    try:
        if path.endswith('.safetensors'):
            return safetensors.torch.load_file(path)
        if _is_torchscript(path):
            # torch.load(weights_only=True) refuses TorchScript archives, and torch.jit.load is their only
            # reader. Only the archive's state dict is used, never its code (as OpenCLIP's load_openai_model).
            return torch.jit.load(path, map_location='cpu').state_dict()
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        detail = (str(e).strip().splitlines() or [''])[0][:200]
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {detail}); expected a file "
                         f"written by torch.save, safetensors or torch.jit.save") from e


def _is_own_checkpoint(obj):
    """A checkpoint written by this project's train_clip.py / train_cls.py."""
    return isinstance(obj, dict) and 'model' in obj and 'model_args' in obj


def _state_dict(obj, path):
    """The weights of any checkpoint form that loads here, OpenCLIP's key names: a state dict (OpenCLIP hub
    file; OpenAI's, whose extra entries are dropped), OpenCLIP's training checkpoint {'state_dict': ...},
    or this project's ckpt.pt {'model': ...}; 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes
    are removed. Returns it and whether it is OpenAI's (which holds the entries _OPENAI_ENTRIES)."""
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    elif _is_own_checkpoint(obj):
        obj = obj['model']
    if not (isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values())):
        raise ValueError(f"{path} holds no state dict of weights (found {type(obj).__name__}"
                         f"{' with keys ' + str(list(obj)[:8]) if isinstance(obj, dict) else ''})")
    state_dict = {}
    for key, value in obj.items():
        while key.startswith(('module.', '_orig_mod.')):
            key = key.split('.', 1)[1]
        state_dict[key] = value
    openai = any(k in state_dict for k in _OPENAI_ENTRIES)
    return {k: v for k, v in state_dict.items() if k not in _OPENAI_ENTRIES}, openai


def load_openclip(model_name='ViT-B-32', pretrained=None, text=None, **overrides) -> CLIP:
    """A DTP-ViT CLIP with the architecture of an OpenCLIP ViT config, e.g. 'ViT-B-32', 'ViT-B-16',
    'ViT-L-14', 'ViT-B-32-quickgelu', and optionally its weights: `pretrained` is a checkpoint file or an
    OpenCLIP pretrained tag such as 'laion2b_s34b_b79k' or 'openai' (downloaded by open_clip). Files that
    load: OpenCLIP's (.pt/.bin/.safetensors, raw or its training checkpoint {'state_dict': ...}, 'module.'
    prefixes allowed), OpenAI's (TorchScript archive or state dict; these get QuickGELU, as trained), and
    this project's own ckpt.pt from train_clip.py (built with the same settings as its run).
    overrides: any DTPConfig field (compression=10, boundary='none', pre_layers=3, width=256, ...);
    text: overrides of OpenCLIP's text_cfg (e.g. dict(width=256, layers=4, context_length=32)).
    With weights, pre_layers + short_layers must be the checkpoint's depth (short_layers defaults to
    it minus pre_layers); without, short_layers defaults to the config's depth minus pre_layers."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        raise ValueError(f"unknown OpenCLIP model {model_name!r}; close matches: {close}")
    vision = cfg['vision_cfg']
    unsupported = {k: v for k, v in vision.items() if k not in _SUPPORTED_VISION_KEYS and v not in _OFF_VALUES}
    if unsupported or not isinstance(vision.get('layers'), int) or vision.get('pool_type', 'tok') not in ('tok', 'avg'):
        raise ValueError(f"{model_name} is not a plain OpenCLIP ViT; this DTP-ViT does not implement: "
                         f"{unsupported or {k: vision.get(k) for k in ('layers', 'pool_type')}}")
    names = {f.name for f in fields(DTPConfig)}
    for key in overrides:
        if key not in names:
            raise TypeError(f"load_openclip: unknown DTPConfig field {key!r}; "
                            f"close matches: {difflib.get_close_matches(key, names)}")
    text_names = {f.name for f in fields(open_clip.CLIPTextCfg)}
    for key in text or {}:
        if key not in text_names:
            raise ValueError(f"load_openclip: unknown text_cfg key {key!r} in text; "
                             f"close matches: {difflib.get_close_matches(key, text_names)}")

    quick_gelu = cfg.get('quick_gelu', False)
    depth, width = vision['layers'], vision['width']
    hint = ''
    if pretrained:
        path = _checkpoint_file(model_name, pretrained)
        checkpoint = read_checkpoint(path)
        state_dict, openai = _state_dict(checkpoint, path)
        if _is_own_checkpoint(checkpoint):
            hint = (f"; {path} is a checkpoint of this project's training scripts, built with "
                    f"{checkpoint['model_args']}: use the same settings (train_cls.py checkpoints hold no text "
                    f"tower), or continue its run with init_from='resume' and its out_dir")
        if openai:
            quick_gelu = True  # OpenAI's CLIP weights (archive or state dict) were trained with QuickGELU
        elif not os.path.isfile(pretrained):  # a tag: OpenCLIP's pretrained config says which activation
            quick_gelu = (open_clip.get_pretrained_cfg(model_name, pretrained) or {}).get('quick_gelu', quick_gelu)
        # The checkpoint's own depth: this project's checkpoints are often shallower than the config.
        depth = len({k.split('.')[3] for k in state_dict if k.startswith('visual.transformer.resblocks.')}) or depth
    pre_layers = overrides.pop('pre_layers', 2)
    short_layers = overrides.pop('short_layers', depth - pre_layers)
    if pretrained and pre_layers + short_layers != depth:
        raise ValueError(f"pre_layers ({pre_layers}) + short_layers ({short_layers}) must equal the depth "
                         f"of the checkpoint {path} ({depth} blocks){hint}")
    image_size = vision.get('image_size', 224)
    vision_cfg = DTPConfig(**{
        **dict(image_size=image_size if isinstance(image_size, int) else image_size[0],
               patch_size=vision['patch_size'], width=width, heads=width // vision.get('head_width', 64),
               mlp_ratio=vision.get('mlp_ratio', 4.0), embed_dim=cfg['embed_dim'], quick_gelu=quick_gelu,
               pool='mean' if vision.get('pool_type') == 'avg' else 'cls',
               pre_layers=pre_layers, short_layers=short_layers),
        **overrides})
    model = CLIP(vision_cfg, {**cfg['text_cfg'], **(text or {})})
    if pretrained:
        _load_weights(model, state_dict, path, hint)
    return model


def load_checkpoint(model: CLIP, path):
    """Load a checkpoint file (any form load_openclip reads) into a DTP-ViT CLIP of the same architecture."""
    _load_weights(model, _state_dict(read_checkpoint(path), path)[0], path)


# DTP's modules (in DTPViT) that OpenCLIP's ViT lacks: they keep their initialisation when loading
# OpenCLIP weights, and flops.py leaves them out of the plain ViT's parameter count.
DTP_MODULES = ('predictor', 'extent_embedding')


def _load_weights(model, state_dict, path, hint=''):
    """Every weight must find its place: a key of the checkpoint that the model lacks, a weight of the
    model (other than DTP's own, the boundary predictor and the extent embeddings, which OpenCLIP does
    not have) that the checkpoint lacks, or a shape that differs, is an error naming them."""
    state_dict = convert_to_custom_text_state_dict(state_dict)  # CLIP's flat text keys -> text.*
    resize_pos_embed(state_dict, model)  # only acts when the image size differs from the checkpoint's
    for name in DTP_MODULES:  # a DTP checkpoint run without them (e.g. as a plain ViT or with fixed pooling)
        if not hasattr(model.visual, name):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(f'visual.{name}.')}
    ours = model.state_dict()
    own = tuple(f'visual.{name}.' for name in DTP_MODULES)
    missing = [k for k in ours if k not in state_dict and not k.startswith(own)]
    unexpected = [k for k in state_dict if k not in ours]
    shapes = [f'{k} {list(v.shape)} vs {list(ours[k].shape)}' for k, v in state_dict.items()
              if k in ours and v.shape != ours[k].shape]
    if missing or unexpected or shapes:
        def some(keys):  # a few names, not the thousands of a whole mismatched architecture
            return f"{keys[:5]}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}"
        raise KeyError(f"checkpoint {path} does not match the model: missing {some(missing)}, unexpected "
                       f"{some(unexpected)}, shapes (checkpoint vs model) {some(shapes)}{hint}")
    model.load_state_dict(state_dict, strict=False)
