"""
ToMe: Token Merging (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) on this
project's plain ViT, the baseline that token-reduction methods are compared against.

    image -> embed -> [CLS] + N tokens
      -> every block: attention (proportional: + log(size) of each key on the logits)
                      -> bipartite soft matching on the attention keys -> merge r tokens
                      -> MLP on the L - r tokens left
      -> ln_post -> [CLS] (or the size-weighted mean of the tokens) -> proj

ToMe needs no new weights and no training: it runs the parameters of any plain DTPViT tower
(boundary='none': a plain-ViT checkpoint, an OpenCLIP one loaded with load_openclip(...,
boundary='none')), and gradients flow through it, so it also trains (train_clip.py's tome_r).

    import tome
    from model import load_openclip
    vit = load_openclip('ViT-B-32', 'open_clip_pytorch_model.bin', boundary='none').visual
    tome.patch(vit, r=8)               # vit(images) now merges 8 tokens per block; r may be a list
    features, aux = vit(images)        # aux as DTPViT's: n_segments, segment_ids, ...
    tome.unpatch(vit)                  # the plain ViT again

Every image of a batch loses the same r tokens per block, so the batch stays rectangular: no
padding, no masks beyond the size term. Written from the paper's description.
"""
import types

import torch
import torch.nn.functional as F


def schedule(r, depth):
    """Tokens to merge in each of `depth` blocks: a constant r, or a list of one r per block."""
    rs = [r] * depth if isinstance(r, int) else [int(v) for v in r]
    if len(rs) != depth or any(v < 0 for v in rs):
        raise ValueError(f"ToMe r={r!r}: expected an int >= 0 or a list of {depth} ints >= 0 (one per block)")
    return rs


def clamp_r(r, n_tokens):
    """How many tokens a block can merge: set A holds ceil(L/2) tokens, [CLS] among them, and each
    merged token leaves A, so at most (L - 1) // 2. A larger r saturates there (as the paper's code)."""
    return min(r, (n_tokens - 1) // 2)


def check_settings(tome_r, tome_cost, boundary):
    """The training scripts' ToMe settings, refused with a one-line message when they cannot apply."""
    if boundary != 'none':
        raise SystemExit(f"config error: tome_r / tome_cost: ToMe merges the plain ViT's tokens; set boundary='none' "
                         f"(got boundary={boundary!r})")
    if tome_r and tome_cost:
        raise SystemExit(f"config error: tome_r={tome_r} and tome_cost={tome_cost}: set one of them, not both")
    if (isinstance(tome_r, int) and tome_r < 0) or not 0 <= tome_cost <= 1:
        raise SystemExit(f"config error: tome_r={tome_r}, tome_cost={tome_cost}: expected tome_r >= 0 (tokens per "
                         f"block) or 0 < tome_cost <= 1 (a fraction of the plain ViT's MMACs)")


def applied(n_tokens, r, depth):
    """The tokens each of depth blocks really merges with schedule r on n_tokens tokens (see clamp_r)."""
    counts = token_counts(n_tokens, schedule(r, depth))
    return [a - b for a, b in zip(counts[:-1], counts[1:])]


def token_counts(n_tokens, rs):
    """Tokens entering each block, and the tokens left after the last one, for a schedule rs."""
    counts = [n_tokens]
    for r in rs:
        counts.append(counts[-1] - clamp_r(r, counts[-1]))
    return counts


def bipartite_soft_matching(keys, r):
    """Which r tokens to merge into which, from the keys (B, L, C) (the attention keys, mean over
    heads). Tokens alternate into set A (even positions, [CLS] at 0) and set B (odd positions); each A
    token is matched to its most similar B token (cosine similarity), and the r A tokens with the most
    similar matches are merged into them. Matching only A -> B can never chain merges within a block,
    which is what makes it one parallel step instead of clustering.
    Returns (kept, src, dst), each (B, k) indices: the A tokens that stay (in their order, so [CLS]
    stays first), the A tokens merged, and the B token each merges into."""
    keys = keys.detach()  # the choice is discrete: gradients flow through the merged values, not through it
    keys = keys / keys.norm(dim=-1, keepdim=True)
    a, b = keys[:, ::2], keys[:, 1::2]
    scores = a @ b.transpose(1, 2)                          # (B, |A|, |B|): the one matmul of the matching
    scores[:, 0] = float('-inf')                            # [CLS] is never merged
    best, best_b = scores.max(dim=2)                        # each A token's most similar B token
    order = best.argsort(dim=1, descending=True)            # the most similar pairs first
    src, kept = order[:, :r], order[:, r:].sort(dim=1).values
    return kept, src, best_b.gather(1, src)


def merge(x, kept, src, dst):
    """x (B, L, C) -> (B, L - r, C): the kept A tokens, then all B tokens, each B token summed with the
    A tokens merged into it. (Sums: size-weighted averages are sums of x * size divided by the summed size.)"""
    C = x.shape[-1]
    a, b = x[:, ::2], x[:, 1::2]
    b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, C), a.gather(1, src[..., None].expand(-1, -1, C)), 'sum')
    return torch.cat([a.gather(1, kept[..., None].expand(-1, -1, C)), b], dim=1)


def new_positions(L, kept, src, dst):
    """(B, L): where each token of the old sequence is after merge(): its own place, or its B token's."""
    B, n_kept, n_b = kept.shape[0], kept.shape[1], L // 2
    where_a = torch.empty(B, (L + 1) // 2, dtype=torch.long, device=kept.device)
    where_a.scatter_(1, kept, torch.arange(n_kept, device=kept.device).expand(B, -1))
    where_a.scatter_(1, src, n_kept + dst)
    where_b = (n_kept + torch.arange(n_b, device=kept.device)).expand(B, -1)
    pos = torch.empty(B, L, dtype=torch.long, device=kept.device)
    pos[:, ::2], pos[:, 1::2] = where_a, where_b
    return pos


def block_forward(block, x, size, r):
    """One transformer block with ToMe: x (B, L, D), size (B, L, 1) float32 (patches per token), or
    None while every token is one patch. Returns x (B, L - r', D) with r' = clamp_r(r, L), its sizes,
    and where each old token went (new_positions; None when nothing merged). The block's own
    parameters, computed as model.Attention does, except that the keys are kept for the matching and
    log(size) is added to the attention logits."""
    attn = block.attn
    B, L, D = x.shape
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(B, L, 3, attn.heads, D // attn.heads).permute(2, 0, 3, 1, 4)  # (B, heads, L, D / heads)
    # Proportional attention: a token that stands for s patches is attended to as if it were s
    # copies of one, so its softmax weight grows by a factor s: + log(s) on the logits. Before the
    # first merge every s is 1: no mask, the plain ViT's exact computation.
    mask = None if size is None else size.log().view(B, 1, 1, L).to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, D)
    x = x + attn.out_proj(y)
    r = clamp_r(r, L)
    pos = None
    if r > 0:
        kept, src, dst = bipartite_soft_matching(k.mean(dim=1), r)
        # Size-weighted averages, sizes adding up: merge x * size and size together, then divide.
        # In float32 at least: sizes run up to N + 1, beyond what bfloat16 holds exactly (256).
        if size is None:
            size = x.new_ones(B, L, 1, dtype=torch.float32)
        wide = torch.promote_types(x.dtype, torch.float32)
        merged = merge(torch.cat([x.to(wide) * size, size.to(wide)], dim=-1), kept, src, dst)
        x, size = (merged[..., :-1] / merged[..., -1:]).to(x.dtype), merged[..., -1:].float().detach()
        pos = new_positions(L, kept, src, dst)
    return x + block.mlp(block.ln_2(x)), size, pos


def tome_forward(vit, images, r, boundaries=None):
    """images (B, 3, H, W) -> (features (B, embed_dim), aux), as DTPViT.forward, with r tokens merged
    per block (an int, or a list of one int per block). r = 0 is the plain ViT exactly.
    aux holds what DTPViT's holds, so training and evaluation code reads it unchanged:
    n_segments (B,): patch tokens left at the end ([CLS] not counted); compression: patches per such
    token; segment_ids (B, N): the final token each patch was merged into, row-major; boundaries (B, N):
    a 1 on the last patch (row-major) of each final token, so that boundaries.sum(1) = n_segments as in
    DTP; boundary_loss: 0 (ToMe learns nothing of its own); token_sizes (B, 1 + n_segments): patches per
    token ([CLS] 1), summing to N + 1."""
    cfg = vit.cfg
    if cfg.boundary != 'none':
        raise ValueError(f"ToMe runs on the plain ViT: build the tower with boundary='none', not {cfg.boundary!r}")
    if boundaries is not None:
        raise ValueError("ToMe takes no boundaries: its merges come from the attention keys")
    if images.ndim != 4 or tuple(images.shape[-2:]) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"ToMe on this tower takes (B, 3, {cfg.image_size}, {cfg.image_size}) images, "
                         f"got {tuple(images.shape)}")
    blocks = vit.transformer.resblocks
    x = vit.embed(images)                                                    # (B, 1 + N, D)
    B, N = x.shape[0], x.shape[1] - 1
    size = None                                                              # all ones until a merge
    token_of = torch.arange(1, N + 1, device=x.device).expand(B, N)          # the token holding each patch
    for block, r_block in zip(blocks, schedule(r, len(blocks))):
        x, size, pos = block_forward(block, x, size, r_block)
        if pos is not None:
            token_of = pos.gather(1, token_of)
    S = x.shape[1] - 1
    if size is None:
        size = x.new_ones(B, S + 1, 1, dtype=torch.float32)
    if cfg.pool == 'cls':
        features = vit.ln_post(x[:, 0])
    else:  # the mean over the patches: each token weighs as many patches as it holds (in float32, as the sizes)
        tokens, w = vit.ln_post(x[:, 1:]), size[:, 1:]
        features = ((tokens.float() * w).sum(1) / w.sum(1)).to(tokens.dtype)
    features = features @ vit.proj

    segment_ids = token_of - 1
    last = torch.full((B, S), -1, dtype=torch.long, device=x.device).scatter_reduce(
        1, segment_ids, torch.arange(N, device=x.device).expand(B, N), 'amax')
    aux = dict(boundary_loss=x.new_zeros((), dtype=torch.float32),
               n_segments=torch.full((B,), S, dtype=torch.long, device=x.device),
               boundaries=x.new_zeros(B, N, dtype=torch.float32).scatter_(1, last, 1.0),
               segment_ids=segment_ids, compression=torch.full((), N / S, device=x.device),
               token_sizes=size.squeeze(-1))
    return features, aux


def _patched_forward(self, images, boundaries=None):
    return tome_forward(self, images, self.tome_r, boundaries)


def patch(vit, r):
    """Make vit(images) run ToMe with r (an int or a per-block list), in place, until unpatch(vit).
    Only the instance's forward changes: the state dict, checkpoints and optimizers are the plain
    ViT's, and DDP, torch.compile and copy.deepcopy see an ordinary module. vit.tome_r may be changed
    afterwards (the paper's training-free sweep over r)."""
    if vit.cfg.boundary != 'none':
        raise ValueError(f"ToMe runs on the plain ViT: build the tower with boundary='none', not {vit.cfg.boundary!r}")
    schedule(r, len(vit.transformer.resblocks))  # a bad r fails here, not at the first forward
    vit.tome_r = r
    vit.forward = types.MethodType(_patched_forward, vit)
    return vit


def unpatch(vit):
    vit.__dict__.pop('forward', None)
    vit.__dict__.pop('tome_r', None)
    return vit
