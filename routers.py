"""
Research beside the paper's model: pooling rules that read the image, and a router that learns
where to cut by REINFORCE. model.py stays the paper's DTP-ViT; this file subclasses it, as tome.py
patches it, and a config selects it with boundary='router', 'color' or 'cosine'.

    python routers.py --style clutter   # how well each rule's cue marks object edges (edge_cues)

    image -> embed -> pre-layers                                  (model.py, unchanged)
      -> boundary rule, one of:
           'color'   no weights: cut where the mean colour of neighbouring patches changes most
           'cosine'  no weights: cut where neighbouring patch features are least alike (H-Net's
                     router with identity projections)
           'router'  learned: logits from each patch and its change to the next, plus the colour
                     change x a learned gain; the k = round(N / compression) cuts drawn one after
                     another with every segment at least min_segment patches long
      -> mean-pool segments (model.py) [+ 'router': embeddings of each segment's first and last patch]
      -> shortened layers [size_attention: + log(patches per segment) on the attention logits]
      -> head                                                        (model.py, unchanged)

    training 'router' (REINFORCE, self-critical):
      sampled cuts  -> features -> loss_s  (the backbone trains on these)
      best cuts     -> features -> loss_g  (no gradient: the baseline)
      the predictor's loss: -(normalised advantage) x log p(sampled cuts), where the cost of a
      sample is loss_s - loss_g + distortion_weight x (its pooling distortion - the best cuts')

What it changes in model.py's DTPViT:
- the boundaries: every rule cuts exactly k segments per image, in training too (so nothing is
  padded), and top-k evaluation takes the k best cuts (min_segment apart for 'router'); 'router' can
  also evaluate with a count per image (eval_boundaries='threshold': calibrate, threshold_cuts);
- 'router' only: its predictor reads 2 x width features (the patch and the absolute change of each
  feature to the next patch) and never sends a gradient into the backbone; its last layer starts at
  zero, so it starts as the colour rule when color_prior > 0 (else with uniform draws); the pooled
  tokens get extent embeddings (zero at first); training runs the shortened layers twice;
- size_attention: each pooled token weighs as its number of patches in attention (ToMe's
  proportional attention);
- the boundary prior is reported but fixed: the cuts are hard samples, with no gradient through it.

Measured on the built-in shapes data (docs/results.md; 3 seeds each, zero-shot top-1): 'router' at
4x 97.4% (fixed pooling 92.7%), at 10x 92.5% (fixed 79.9%). Its cue: the colour change between
neighbouring patches, which marks the shapes' edges in that data (see README, Results).
"""
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (DTPConfig, DTPViT, boundary_aux, fixed_boundaries, float32_call, join, pool_segments,
                   segment_ids, topk_boundaries)

RULES = ('router', 'color', 'cosine')
LEARNED_ONLY = ('min_segment', 'color_prior', 'noise', 'distortion_weight', 'lr_scale')  # 'router' settings


@dataclass
class RouterConfig(DTPConfig):
    boundary: str = 'router'        # 'router' (learned, by REINFORCE), 'color' or 'cosine' (no weights)
    min_segment: int = 2            # 'router': every segment holds at least this many patches (1: no minimum)
    color_prior: float = 4.0        # 'router': initial gain of the colour change in its logits (0: none)
    noise: float = 2.0              # 'router': scale of the Gumbel noise of its training samples
    distortion_weight: float = 3.0  # 'router': + this x the pooling distortion in a sample's REINFORCE cost
    lr_scale: float = 10.0          # 'router': the predictor's learning rate, relative to the script's lr
    size_attention: bool = False    # + log(patches in the segment) on each pooled token's attention logits

    BOUNDARIES: ClassVar[tuple] = RULES

    def __post_init__(self):
        super().__post_init__()
        for name in ('noise', 'lr_scale'):
            if not getattr(self, name) > 0:
                raise ValueError(f"RouterConfig.{name}={getattr(self, name)}: must be > 0")
        for name in ('color_prior', 'distortion_weight'):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RouterConfig.{name}={getattr(self, name)}: must be >= 0 (0: off)")
        n, k, m = self.n_patches, self.n_segments, self.min_segment
        if m < 1:
            raise ValueError(f"RouterConfig.min_segment={m}: must be >= 1 (1: no minimum)")
        # each cut rules out at most 2 m - 1 of the N - 2 m + 1 patches a cut may take
        if self.boundary == 'router' and n - 2 * m < (k - 2) * (2 * m - 1):
            raise ValueError(f"RouterConfig.min_segment={m}: {k} segments of {n} patches cannot all be sure to get "
                             f"{m} or more; use a smaller min_segment or a higher compression")

    @property
    def learned(self):
        return self.boundary == 'router'


def spaced_cuts(logits, k, min_len, noise=None, eps=1e-6):
    """k boundaries (the last patch one of them) that leave every segment at least min_len patches, and the
    log-probability of the draw, (B,). The k - 1 cuts come one after another, each at a patch still allowed
    (at least min_len from the cuts before it and from both ends): drawn from a softmax over those patches'
    logits / noise (a Gumbel-max draw), or, without noise, the largest of those logits, as evaluation takes
    them. A draw's log-probability is the sum of its k - 1 log-softmaxes (Plackett-Luce), what REINFORCE
    differentiates."""
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


def threshold_cuts(logits, threshold, min_len):
    """Evaluation with a count per image: every place whose logit is above threshold, the best first, each
    at least min_len from the cuts before it and from both ends (as spaced_cuts); the last patch closes a
    segment. An image with many strong places gets more segments, a plain one fewer. (B, N) 0/1."""
    B, N = logits.shape
    scores = logits[:, :-1]
    t = torch.arange(N - 1, device=logits.device)
    allowed = (t >= min_len - 1) & (t <= N - 1 - min_len) & (scores > threshold)
    hard = torch.zeros_like(logits)
    while allowed.any():
        pick = scores.masked_fill(~allowed, float('-inf')).argmax(dim=1, keepdim=True)
        took = allowed.any(dim=1, keepdim=True)                     # a row with nothing left adds nothing
        hard[:, :-1].scatter_add_(1, pick, took.to(hard.dtype))
        allowed &= (t - pick).abs() >= min_len
    hard[:, -1] = 1.0
    return hard


def pooling_distortion(x, b, pooled):
    """(B,): the share of the patches' variance (about their image's mean) that replacing each patch of
    x (B, N, D) by the mean of its segment (pooled, from pool_segments over the cuts b) throws away: 0
    when the patches of every segment are alike, 1 when every segment's mean is the image's mean. A
    reading, without gradient, that REINFORCE adds to a sample's cost (distortion_weight), to pay for
    segments that their mean token describes well."""
    x, pooled = x.detach().float(), pooled.detach().float()
    seg = segment_ids(b.detach()).long().unsqueeze(-1).expand_as(x)
    lost = (x - pooled.gather(1, seg)).square().sum(dim=(1, 2))
    return lost / (x - x.mean(dim=1, keepdim=True)).square().sum(dim=(1, 2)).clamp(min=1e-6)


def reinforce_loss(aux, sample_losses, greedy_losses, distortion_weight=0.0):
    """The router's REINFORCE loss. Each image's cuts were sampled with log-probability
    aux['boundary_log_prob'] (B,); their cost is the image's own task loss (sample_losses, (B,)) less the
    loss of the same image with the router's best cuts (greedy_losses: the self-critical baseline, which
    takes the image's difficulty out; a batch-mean baseline leaves it in, as noise 2-10x larger than what
    the cuts change), plus distortion_weight x the difference of their pooling distortions. The advantage
    is normalised over the batch, so the step does not depend on the scale of the loss. It is the
    predictor's only gradient: its samples are hard 0/1 values."""
    cost = sample_losses - greedy_losses
    if distortion_weight:
        cost = cost + distortion_weight * (aux['pooling_distortion'] - aux['greedy_distortion'])
    advantage = cost.detach().float()
    advantage = (advantage.mean() - advantage) / (advantage.std(correction=0) + 1e-6)
    return -(advantage * aux['boundary_log_prob']).mean()


class Biased:
    """A Packing (or None: nothing packed) whose attention mask is an additive float bias."""

    def __init__(self, packing, bias):
        self.packing, self.attn_mask = packing, bias

    def pack(self, x):
        return x if self.packing is None else self.packing.pack(x)

    def unpack(self, x):
        return x if self.packing is None else self.packing.unpack(x)


class RouterViT(DTPViT):
    config_class = RouterConfig
    cut_threshold = None  # eval_boundaries='threshold': set by calibrate

    def boundary_predictor(self, reads):
        """The router's predictor, built where model.py builds its own, and its extent embeddings."""
        predictor = super().boundary_predictor(2 * reads)  # each patch, and its change to the next
        nn.init.zeros_(predictor[-1].weight)  # REINFORCE starts at the colour prior alone (or uniform draws)
        if self.cfg.color_prior > 0:  # one learned gain on the colour change
            predictor.register_parameter('color_gain', nn.Parameter(torch.tensor(self.cfg.color_prior)))
        # Row i: added to the pooled token of a segment that starts (ends) at patch i. Zero at first, so a model
        # loaded from OpenCLIP weights computes what it did without them. (Registered here, after the predictor and
        # before ln_post: the parameter order, and so the gradient clipping's sums, of the runs in docs/results.md.)
        self.predictor = predictor
        zeros = torch.zeros(self.cfg.n_patches, self.cfg.width)
        self.extent_embedding = nn.ParameterDict(dict(start=nn.Parameter(zeros), end=nn.Parameter(zeros.clone())))
        return predictor

    def forward(self, images, boundaries=None):
        """As DTPViT.forward. Training 'router' (without given boundaries), aux also holds
        boundary_log_prob (B,) of the sampled cuts, greedy_features (B, embed_dim): the images with the best
        cuts, without gradient, and pooling_distortion / greedy_distortion (B,) of both (reinforce_loss)."""
        cfg = self.cfg
        x, scores = self.cut_scores(images)
        sample = self.training and cfg.boundary == 'router' and boundaries is None
        if boundaries is not None:
            b, count = boundaries.to(device=x.device, dtype=torch.float32), None
            b = torch.cat([b[:, :-1], b.new_ones(b.shape[0], 1)], dim=1)  # the last patch closes a segment
        elif sample:
            b, log_prob = spaced_cuts(scores, cfg.n_segments, cfg.min_segment, cfg.noise)
            count = cfg.n_segments
        elif cfg.eval_boundaries == 'threshold':  # 'router' in evaluation, a count per image
            if self.cut_threshold is None:
                raise RuntimeError("eval_boundaries='threshold': call calibrate(batches of images) first, which sets "
                                   "the threshold that gives these images the target mean count")
            b, count = threshold_cuts(scores, self.cut_threshold, cfg.min_segment), None
        else:
            b, count = self.best_cuts(scores), cfg.n_segments
        features, aux = self.shorten(x, b, count)
        if cfg.boundary == 'router':
            aux['boundary_logits'] = scores
        if sample:  # the self-critical baseline: the same images with the best cuts, without gradient
            with torch.no_grad():
                aux['greedy_features'], greedy = self.shorten(x, self.best_cuts(scores.detach()), count)
            aux.update(boundary_log_prob=log_prob, greedy_distortion=greedy['pooling_distortion'])
        return features, aux

    def cut_scores(self, images):
        """images -> the tokens after the full-length blocks (B, 1 + N, D) and the rule's scores (B, N)."""
        x = self.embed(images)
        for block in self.transformer.resblocks[:self.cfg.pre_layers]:
            x = block(x)
        return x, self.scores(x[:, 1:], images)

    @torch.no_grad()
    def calibrate(self, batches):
        """eval_boundaries='threshold' ('router'): set cut_threshold, the logit above which evaluation cuts
        (threshold_cuts), to the value that gives these images (an iterable of (B, 3, H, W) batches) the target
        mean segment count round(N / compression), so that per-image counts cost what top-k costs on average.
        The router is trained to choose k places, not how many, so its logits have no threshold of their own
        (the paper's predictor has p > 0.5). Returns the threshold and the images' mean count."""
        was_training = self.training
        scores = torch.cat([self.eval().cut_scores(images)[1].float() for images in batches])
        self.train(was_training)
        m, k = self.cfg.min_segment, self.cfg.n_segments

        def mean_count(threshold):
            return threshold_cuts(scores, threshold, m).sum(1).mean().item()
        lo, hi = scores.min().item() - 1, scores.max().item()  # every allowed cut, and none (one segment)
        for _ in range(50):  # the mean count falls as the threshold rises: bisect to where it crosses k
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mean_count(mid) > k else (lo, mid)
        self.cut_threshold = min((lo, hi), key=lambda t: (abs(mean_count(t) - k), mean_count(t)))
        return self.cut_threshold, mean_count(self.cut_threshold)

    def scores(self, patches, images):
        """(B, N): the rule's score for closing a segment after each patch (the last patch closes one anyway)."""
        cfg = self.cfg
        if cfg.boundary == 'color':
            # From the pixels, not the features: an image's segments stay the same through the whole run.
            return self.color_change(images)
        if cfg.boundary == 'cosine':  # 1 - cosine of neighbouring patches' features, in [0, 2]
            h = F.normalize(patches.detach().float(), dim=-1)
            return F.pad(1 - (h[:, :-1] * h[:, 1:]).sum(dim=-1), (0, 1))
        with torch.autocast(patches.device.type, enabled=False):
            reads = patches.detach()  # REINFORCE's gradient is the predictor's alone: the backbone learns from the task
            # A cut lies between two patches: the predictor gets patch t and how far each feature moves to patch
            # t + 1, absolute so that its first linear layer can sum it into a distance (the signed change put 42%
            # of cuts in place after 100 steps of the unit test, against 89%).
            reads = torch.cat([reads, F.pad((reads[:, 1:] - reads[:, :-1]).abs(), (0, 0, 0, 1))], dim=-1)
            logits = float32_call(self.predictor, reads).squeeze(-1)
            if cfg.color_prior > 0:  # z-scored per image, so that the gain alone says how much colour counts
                change = self.color_change(images)[:, :-1]
                change = (change - change.mean(1, keepdim=True)) / change.std(1, keepdim=True).clamp_min(1e-3)
                logits = logits + self.predictor.color_gain.float() * F.pad(change, (0, 1))
        return logits

    def best_cuts(self, scores):
        """The cuts evaluation takes: the k best-scoring places (for 'router', one after another, min_segment apart)."""
        if self.cfg.boundary == 'router':
            return spaced_cuts(scores, self.cfg.n_segments, self.cfg.min_segment)[0]
        return topk_boundaries(scores, self.cfg.n_segments)

    def color_change(self, images):
        """(B, N): how far the mean colour of the next patch is from this patch's (Euclidean, in the
        normalised input); 0 at the last patch."""
        rgb = F.avg_pool2d(images.float(), self.cfg.patch_size).flatten(2).transpose(1, 2)  # (B, N, 3)
        return F.pad((rgb[:, :-1] - rgb[:, 1:]).norm(dim=-1), (0, 1))

    def shorten(self, x, b, count):
        """The pre-layers' tokens (B, 1 + N, D) and cuts b -> (features, aux): pooling, the shortened layers, the head."""
        cfg = self.cfg
        segments, real, sizes = pool_segments(x[:, 1:], b, count)
        aux = dict(boundary_aux(b, cfg), segment_sizes=sizes)
        if cfg.boundary == 'router':
            if self.training:
                aux['pooling_distortion'] = pooling_distortion(x[:, 1:], b, segments)
            segments = segments + self.extent(b.detach(), segments.shape[1]).to(segments.dtype)
        x, packing = join(x[:, :1], segments, real)
        attention = Biased(packing, self.size_bias(sizes, packing)) if cfg.size_attention else packing
        for block in self.transformer.resblocks[cfg.pre_layers:]:
            x = block(x, attention)
        return self.head(x, packing), aux

    def extent(self, b, n_segments):
        """(B, n_segments, D): each segment's start embedding (of its first patch) plus its end embedding
        (of its last patch, where b = 1); zero at the padding. Gathers and adds only: no FLOPs to count."""
        start = F.pad(b[:, :-1], (1, 0), value=1.0)  # a patch starts a segment if the one before closed one
        e = self.extent_embedding
        per_patch = start.unsqueeze(-1) * e['start'].float() + b.unsqueeze(-1) * e['end'].float()  # (B, N, D)
        seg = segment_ids(b).long().unsqueeze(-1).expand_as(per_patch)
        return per_patch.new_zeros(b.shape[0], n_segments, per_patch.shape[-1]).scatter_add_(1, seg, per_patch)

    def size_bias(self, sizes, packing):
        """Size-aware attention (as ToMe's proportional attention): a key that stands for s patches gets
        + log(s) on its attention logits, i.e. the weight of s copies of one token; [CLS] counts as one,
        padding gets -inf. (B, 1, 1, 1 + S), float32."""
        bias = torch.log(sizes.float().clamp(min=1e-6))
        if packing is not None:
            bias = bias.masked_fill(~packing.attn_mask[:, 0, 0, 1:], float('-inf'))
        return F.pad(bias, (1, 0), value=0.0)[:, None, None, :]


# ----------------------------------------------------------------------------------------------
# What each rule reads: how well its cue marks the objects' edges on the built-in shapes data

def edge_auc(scores, edges):
    """The area under the ROC curve of scores (n,) for telling edges (n,) bool from the rest: the chance that
    a random object edge scores above a random other neighbour pair (ties count half); 0.5 is no signal."""
    pos, neg = scores[edges].float(), scores[~edges].float()
    if not len(pos) or not len(neg):
        return float('nan')
    wins = sum(((p[:, None] > neg).sum() + 0.5 * (p[:, None] == neg).sum()).item() for p in pos.split(1024))
    return wins / (len(pos) * len(neg))


@torch.no_grad()
def edge_cues(images, objects, cfg, checkpoint=None, seed=0):
    """{cue: (AUC, share of object edges cut)} on images (B, 3, H, W) whose object patches (B, N) are known.
    An object edge is a neighbour pair of the patch sequence (raster order) with one patch on an object and
    the other not; a cue scores each pair, and its rule takes the k = round(N / compression) best (as
    RouterViT.best_cuts). Cues: the pixels' colour change ('color'), the feature cosine change after the
    pre-layers of a tower at initialisation ('cosine', torch seed `seed`), and evenly spaced cuts ('fixed',
    no scores). A trained tower (checkpoint: an nn.Module, DTPViT or RouterViT) adds its own logits and cuts."""
    edges = (objects[:, 1:] != objects[:, :-1]).flatten()
    rows = {}
    for rule in ('color', 'cosine'):
        torch.manual_seed(seed)
        tower = RouterViT(RouterConfig(**{**vars(cfg), 'boundary': rule, 'eval_boundaries': 'topk'})).eval()
        scores = tower.cut_scores(images)[1]
        rows[rule] = (edge_auc(scores[:, :-1].flatten(), edges), tower.best_cuts(scores))
    rows['fixed'] = (float('nan'), fixed_boundaries(len(images), cfg.n_patches, cfg.n_segments))
    if checkpoint is not None:
        _, aux = checkpoint.eval()(images)
        logits = aux.get('boundary_logits')
        auc = float('nan') if logits is None else edge_auc(logits[:, :-1].flatten(), edges)
        rows['checkpoint'] = (auc, aux['boundaries'])
    return {name: (auc, (b[:, :-1].flatten()[edges] > 0).float().mean().item()) for name, (auc, b) in rows.items()}


def main():
    import argparse
    import open_clip
    import data
    parser = argparse.ArgumentParser(description="How well each rule's cue marks the objects' edges on a built-in "
                                                 "shapes style: AUC over neighbour pairs, share of object edges cut.")
    parser.add_argument('--style', default='colour', choices=data.SHAPES_STYLES)
    parser.add_argument('--compression', type=float, default=4.0)
    parser.add_argument('--images', type=int, default=600, help='val images, evenly spread over the classes')
    parser.add_argument('--checkpoint', help="also a trained run's tower (train_clip.py or train_cls.py ckpt.pt)")
    parser.add_argument('--seed', type=int, default=0, help="torch seed of the towers at initialisation")
    args = parser.parse_args()
    # the demo's tower (train_clip.py's defaults): 48 px, 8 px patches, two full-length blocks
    cfg = RouterConfig(image_size=48, patch_size=8, width=128, heads=4, embed_dim=128, pre_layers=2, short_layers=4,
                       compression=args.compression)
    tower = None
    if args.checkpoint:
        import flops
        tower = flops.load_tower(args.checkpoint, 'ViT-B-32', None, None, None)[0]
        cfg = RouterConfig(**{**vars(cfg), **{k: getattr(tower.cfg, k) for k in (
            'image_size', 'patch_size', 'width', 'heads', 'pre_layers', 'compression')}})
    paths = data.shapes_paths(data.make_shapes(style=args.style)['root'])['val']
    samples = sorted(p for p in data.Path(paths).rglob('*.jpg'))
    samples = [samples[i] for i in torch.linspace(0, len(samples) - 1, min(args.images, len(samples))).long()]
    transform = open_clip.image_transform(cfg.image_size, is_train=False)
    images = torch.stack([transform(data.load_image(p)) for p in samples])
    objects = data.shapes_object_patches(samples, transform, cfg.patch_size)
    cues = edge_cues(images, objects, cfg, tower, args.seed)
    n_edges = (objects[:, 1:] != objects[:, :-1]).sum().item()
    print(f"shapes_style={args.style!r}: {len(samples)} val images, {cfg.n_patches} patches, "
          f"{n_edges / len(samples):.1f} object edges per image, {cfg.compression:g}x ({cfg.n_segments} segments)")
    names = dict(color='colour change of the pixels', cosine='feature cosine change at init',
                 fixed='evenly spaced (no cue)', checkpoint=f'{args.checkpoint}')
    print(f"| cue | AUC | object edges cut at {cfg.compression:g}x |\n|---|---|---|")
    for name, (auc, cut) in cues.items():
        print(f"| {names[name]} | {'-' if auc != auc else f'{auc:.2f}'} | {100 * cut:.0f}% |")


if __name__ == '__main__':
    main()
