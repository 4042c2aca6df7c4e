"""
FLOPs of the plain ViT and of DTP-ViT, counted by fvcore and by a closed form, and (--bench) the
speed they actually reach.

    python flops.py --ratio 4                        # plain ViT-B-32, then DTP-ViT at 4x
    python flops.py --model ViT-B-16 --json          # ratios 1 2 4 10, one JSON list
    python flops.py --bench [--threads 1]            # + throughput, train step, peak memory
    python flops.py --tome-r 8 --tome-cost 0.6 0.42  # + ToMe rows (tome.py): r=8, and costs matched to 0.6, 0.42
    python flops.py --checkpoint ckpt.pt --data data/shapes/val   # what a trained model spends

GMACs are fvcore's "flops": one multiply-add counts as one FLOP. GFLOPs = 2 x GMACs, the figure
OpenCLIP (8.82 for ViT-B-32) and most papers quote.
Counted: the patch-embedding conv, every linear layer (qkv and output projections, MLPs, boundary
predictor), both attention matmuls (q k^T and attn v), the pooling einsum, the final projection.
Not counted (element-wise, left out as fvcore and DynamicViT do): residual adds, GELU, softmax and
scaling inside attention, layer norms (fvcore's default handle would add ~5 per element, 0.005 G on
ViT-B-32; dropped so the count matches OpenCLIP's), dropout, the padding mask, the boundary logic
(top-k, cumsum, the pooling weights and their normalisation), the boundary loss, and the cosine
router's similarities of neighbouring patches (N x width multiply-adds: 0.04 M on ViT-B-32).

The trap (docs/method.md, section 3): fvcore silently counts ZERO for
aten::scaled_dot_product_attention, which our attention calls, so a handle is registered for it
(and its fused variants); any other attention op left uncounted is an error, not a warning.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
with warnings.catch_warnings():  # fvcore's import scripts a function with torch.jit, which this torch deprecates
    warnings.simplefilter('ignore', FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import (addmm_flop_jit, bmm_flop_jit, conv_flop_jit, einsum_flop_jit, get_shape,
                                       linear_flop_jit, matmul_flop_jit)

import data
import tome
from model import DTPConfig, DTPViT, fixed_boundaries, is_new, load_openclip, read_checkpoint
from train_utils import boundary_confidence, segment_quality, tower_class

# -----------------------------------------------------------------------------------------------
# Counting with fvcore

ATTENTION_OPS = ('aten::scaled_dot_product_attention', 'aten::_scaled_dot_product_flash_attention',
                 'aten::_scaled_dot_product_flash_attention_for_cpu',
                 'aten::_scaled_dot_product_efficient_attention', 'aten::_scaled_dot_product_cudnn_attention')
# The multiply-add ops, with fvcore's own handles. fvcore's defaults also count norms (~5 per element)
# and resampling; those are left out, as OpenCLIP's count leaves them out (see the docstring).
MATMUL_OPS = {'aten::_convolution': conv_flop_jit, 'aten::linear': linear_flop_jit, 'aten::addmm': addmm_flop_jit,
              'aten::matmul': matmul_flop_jit, 'aten::mm': matmul_flop_jit, 'aten::bmm': bmm_flop_jit,
              'aten::einsum': einsum_flop_jit}


def attention_flop_jit(inputs, outputs):
    """MACs of softmax(q k^T) v: q (..., L, E), k (..., S, E), v (..., S, Ev) -> L S E + L S Ev."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


class Traced(nn.Module):
    """What fvcore traces: the tower's features and, where there is a predictor, its logits. When
    boundaries are passed in, the predicted ones are unused; were the logits not an output too, the
    JIT tracer would delete the predictor, and its cost, from the graph."""

    def __init__(self, tower):
        super().__init__()
        self.tower = tower

    def forward(self, images, boundaries=None):
        features, aux = self.tower(images, boundaries)
        return (features, aux['boundary_logits']) if 'boundary_logits' in aux else features


def fvcore_count(tower, images, boundaries=None, attention=True):
    """fvcore's FlopCountAnalysis of one eval-mode forward (.total() is in MACs)."""
    traced, was_training = Traced(tower), tower.training
    tower.eval()
    try:
        inputs = (images,) if boundaries is None else (images, boundaries)
        analysis = FlopCountAnalysis(traced, inputs).clear_op_handles().set_op_handle(**MATMUL_OPS)
        if attention:
            analysis.set_op_handle(**{op: attention_flop_jit for op in ATTENTION_OPS})
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with warnings.catch_warnings():  # the tracer's warnings about baked-in shapes are expected
            warnings.simplefilter('ignore')
            analysis.total()
    finally:
        tower.train(was_training)
    missed = [op for op in analysis.unsupported_ops()
              if any(word in op for word in ('attention', 'mm', 'matmul', 'linear', 'conv', 'einsum'))]
    if attention and missed:
        raise RuntimeError(f"fvcore has no handle for {missed}: the count would silently miss them")
    return analysis


# -----------------------------------------------------------------------------------------------
# The same count in closed form: where a (DTP-)ViT's multiply-adds go, per image

def closed_form(cfg: DTPConfig, n_segments=None):
    """MACs per image by component, counting what fvcore counts (see the docstring). n_segments:
    segments after pooling (padded: the batch maximum); default cfg.n_segments, round(N / compression).
    ViT-B/32 at 224 (50 tokens, width 768, 12 layers, MLP 3072), in GMACs: MLPs 2.831, qkv + out
    projections 1.416, patch embedding 0.116, attention matmuls 0.046, projection 0.0004: 4.409."""
    D, N, p = cfg.width, cfg.n_patches, cfg.patch_size
    hidden = int(D * cfg.mlp_ratio)
    dtp = cfg.boundary != 'none'
    S = (n_segments or cfg.n_segments) if dtp else N
    tokens = [N + 1] * cfg.pre_layers + [1 + S] * cfg.short_layers  # [CLS] + tokens through each block
    h = cfg.predictor_hidden or D
    reads = 2 * D if cfg.boundary == 'router' else D  # routers.py's router reads each patch and its change to the next
    return {
        'patch embedding': N * 3 * p * p * D,  # the conv is a (3 p p) -> D linear map per patch
        'qkv + out projections': sum(L * D * 3 * D + L * D * D for L in tokens),
        'attention matmuls': sum(2 * L * L * D for L in tokens),  # q k^T and attn v, all heads together
        'MLPs': sum(2 * L * D * hidden for L in tokens),
        'boundary predictor': N * (reads * h + h) if cfg.learned else 0,  # Linear(reads, h), Linear(h, 1)
        'pooling': S * N * D if dtp else 0,  # einsum('bns,bnd->bsd'): segment weights x patch tokens
        'projection': D * cfg.embed_dim,  # [CLS] (or mean) token -> embedding
    }


def plain_config(cfg):
    """The plain ViT of a DTP (or router) config: model.py's DTPConfig with the same geometry, no pooling."""
    return DTPConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(DTPConfig)
                        if f.name not in ('boundary', 'eval_boundaries')}, boundary='none')


def gmacs(cfg, n_segments=None):
    return sum(closed_form(cfg, n_segments).values()) / 1e9


def padded_gmacs(cfg, n_segments, padded_to):
    """What the model runs for an image of n_segments in a batch padded to padded_to segments: the
    shortened blocks pack the real tokens, so only attention and the pooling einsum see the padding."""
    real, padded = closed_form(cfg, n_segments), closed_form(cfg, padded_to)
    seen = ('attention matmuls', 'pooling')
    return (sum(real.values()) - sum(real[k] for k in seen) + sum(padded[k] for k in seen)) / 1e9


# -----------------------------------------------------------------------------------------------
# ToMe (tome.py) on the plain ViT, in the same convention

def tome_closed_form(cfg: DTPConfig, r):
    """MACs per image of ToMe on the plain ViT of cfg (every block, whatever pre_layers says), with r
    tokens merged per block (an int or one per block), by component, counting what the code runs and
    fvcore counts. Block i takes L_i tokens: its qkv + out projections and attention matmuls run at
    L_i; then r_i = min(r, (L_i - 1) // 2) tokens merge, and its MLP runs at L_i - r_i. The matching
    of a block that merges adds one matmul, the cosine similarities of set A (ceil(L_i / 2) tokens)
    with set B (floor(L_i / 2)) on the keys averaged over heads (width / heads each). Not counted,
    as everywhere here: the element-wise rest of the matching (normalising, max, argsort, gathers,
    scatter-adds), the size-weighted averages and the log(size) attention mask."""
    D, N, p = cfg.width, cfg.n_patches, cfg.patch_size
    hidden = int(D * cfg.mlp_ratio)
    counts = tome.token_counts(N + 1, tome.schedule(r, cfg.pre_layers + cfg.short_layers))
    blocks = list(zip(counts[:-1], counts[1:]))  # (tokens in, tokens after the merge) of each block
    return {
        'patch embedding': N * 3 * p * p * D,
        'qkv + out projections': sum(L * D * 3 * D + L * D * D for L, _ in blocks),
        'attention matmuls': sum(2 * L * L * D for L, _ in blocks),
        'matching': sum((L + 1) // 2 * (L // 2) * (D // cfg.heads) for L, M in blocks if M < L),
        'MLPs': sum(2 * M * D * hidden for _, M in blocks),
        'projection': D * cfg.embed_dim,
    }


def tome_gmacs(cfg, r):
    return sum(tome_closed_form(cfg, r).values()) / 1e9


def tome_r_for_cost(cfg, rel_cost, per_block=False):
    """The ToMe r whose cost (closed form) is nearest rel_cost x the plain ViT's, e.g. 0.6 or 0.42 to
    sit beside DTP at 2x or 4x on ViT-B-32 (pre_layers 2). The cost falls as r grows, down to where
    every block halves the tokens (r >= (N + 1) // 2 saturates). per_block=False: the nearest constant
    r (the paper's setting; on short sequences one step of r moves the cost by several percent).
    per_block=True: a finer match, r + 1 in the first k blocks and r in the rest (a list, or an int when
    k is 0)."""
    plain, depth = gmacs(plain_config(cfg)), cfg.pre_layers + cfg.short_layers

    def miss(r):
        return abs(tome_gmacs(cfg, r) / plain - rel_cost)
    cheapest = tome_gmacs(cfg, cfg.n_patches // 2) / plain  # every block halves the tokens
    if not cheapest - 1e-6 <= rel_cost <= 1:
        raise ValueError(f"ToMe cost {rel_cost} of the plain ViT: ToMe's schedules on this tower cost between "
                         f"{cheapest:.3f} (every block halving the tokens) and 1")
    r = min(range(cfg.n_patches // 2 + 1), key=miss)
    if not per_block:
        return r
    # the cost is monotone in r and in k, so the best schedule lies between r - 1 and r + 1 everywhere
    candidates = [[r] * depth] + [[low + 1] * k + [low] * (depth - k) for low in (max(r - 1, 0), r)
                                  for k in range(1, depth)]  # the constant r first: it wins ties
    best = min(candidates, key=miss)
    return best[0] if len(set(best)) == 1 else best


def format_r(r):
    """A ToMe schedule in short: r=8, or r=[4]*5+[3]*7 for 4 in the first 5 blocks, then 3."""
    if isinstance(r, int):
        return f'r={r}'
    runs = []
    for v in r:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return 'r=' + '+'.join(f'[{v}]*{n}' for v, n in runs)


def tome_rows(base, rs, plain_macs, common):
    """FLOP-table rows of ToMe with each r of rs on the plain ViT of base: fvcore's count of the patched
    tower and the closed form. tokens: the tokens that reach ln_post ([CLS] included). Also returns the
    ops fvcore left uncounted."""
    images = torch.zeros(1, 3, base.image_size, base.image_size)
    depth, rows, uncounted = base.pre_layers + base.short_layers, [], set()
    for r in rs:
        tower = tome.patch(DTPViT(base), r)
        analysis = fvcore_count(tower, images)
        macs = analysis.total()
        uncounted |= set(analysis.unsupported_ops())
        counts = tome.token_counts(base.n_patches + 1, tome.schedule(r, depth))
        rows.append(dict(common, pooling='tome', ratio=None, tome_r=r, tokens=counts[-1], tokens_per_block=counts[:-1],
                         macs=macs, gmacs=macs / 1e9, gflops=2 * macs / 1e9, closed_form_gmacs=tome_gmacs(base, r),
                         params=n_params(tower), rel_cost=macs / plain_macs,
                         overhead_gmacs=tome_closed_form(base, r)['matching'] / 1e9))
    return rows, uncounted


# -----------------------------------------------------------------------------------------------
# The FLOP table

@contextlib.contextmanager
def user_error(what):
    """A model, checkpoint or setting given on the command line that cannot be used: one line, no traceback."""
    try:
        yield
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise SystemExit(f"flops.py: {what}: {e.args[0] if e.args else e}") from None


def base_config(model, image_size=None, pre_layers=None):
    """DTPConfig of the plain ViT with an OpenCLIP config's geometry (model.load_openclip's mapping)."""
    overrides = {k: v for k, v in dict(image_size=image_size, pre_layers=pre_layers).items() if v is not None}
    with user_error(f'--model {model}'):
        return load_openclip(model, boundary='none', **overrides).visual.cfg


def n_params(tower):
    return sum(p.numel() for p in tower.parameters())


def flop_rows(model, ratios, image_size=None, pre_layers=None):
    base = base_config(model, image_size, pre_layers)
    N, size = base.n_patches, base.image_size
    images = torch.zeros(1, 3, size, size)
    plain = DTPViT(base)
    macs = fvcore_count(plain, images).total()
    common = dict(arch=model, image_size=size, pre_layers=base.pre_layers)
    rows = [dict(common, pooling='none', ratio=1.0, tokens=N + 1, macs=macs, gmacs=macs / 1e9,
                 gflops=2 * macs / 1e9, closed_form_gmacs=gmacs(base), params=n_params(plain),
                 rel_cost=1.0, overhead_gmacs=0.0)]
    uncounted = set()
    for r in map(float, ratios):
        # The real gumbel model with its predictor; ratio r is simulated by evenly spaced boundaries
        # giving exactly the segments evaluation keeps (cfg.n_segments), since fvcore traces one static graph.
        cfg = dataclasses.replace(base, boundary='gumbel', compression=r)
        tower = DTPViT(cfg)
        S = cfg.n_segments
        analysis = fvcore_count(tower, images, fixed_boundaries(1, N, S))
        macs = analysis.total()
        overhead = analysis.by_module()['tower.predictor'] + analysis.by_operator().get('einsum', 0)
        rows.append(dict(common, pooling='dtp', ratio=r, tokens=1 + S, macs=macs, gmacs=macs / 1e9,
                         gflops=2 * macs / 1e9, closed_form_gmacs=gmacs(cfg, S), params=n_params(tower),
                         rel_cost=macs / rows[0]['macs'], overhead_gmacs=overhead / 1e9))
        uncounted |= set(analysis.unsupported_ops())
    return rows, base, sorted(uncounted)


def print_table(columns, rows):
    cells = [[title for title, _ in columns]] + [[fmt(row) for _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print('  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip())


FLOP_COLUMNS = [
    ('arch', lambda r: r['arch']), ('pooling', lambda r: r['pooling']),
    ('ratio', lambda r: '-' if r['pooling'] == 'none' else
     format_r(r['tome_r']) if r['pooling'] == 'tome' else f"{r['ratio']:g}"),
    ('tokens', lambda r: f"{r['tokens']:g}"), ('GMACs', lambda r: f"{r['gmacs']:.3f}"),
    ('GFLOPs', lambda r: f"{r['gflops']:.2f}"), ('params', lambda r: f"{r['params'] / 1e6:.2f}M"),
    ('rel. cost', lambda r: f"{r['rel_cost']:.3f}"),
    ('predictor+pool', lambda r: '-' if r['pooling'] == 'none' else
     f"{r['overhead_gmacs']:.3f} ({100 * r['overhead_gmacs'] / r['gmacs']:.1f}%)"),
]


# -----------------------------------------------------------------------------------------------
# --checkpoint --data: the FLOPs a trained model spends on real images

IMAGE_EXTENSIONS = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}


def strip_prefixes(key):
    while key.startswith(('_orig_mod.', 'module.')):  # torch.compile and DDP wrappers
        key = key.split('.', 1)[1]
    return key


def load_tower(path, model, ratio=None, pre_layers=None, image_size=None):
    """The DTP-ViT image tower of a checkpoint and its architecture's name. Three kinds:
    train_clip.py / train_cls.py: {'model': state dict with visual.* keys, 'model_args': load_openclip's
    arguments, ...}; {'model': ..., 'config': DTPConfig fields under their own names (plus, optionally,
    `model`, an OpenCLIP config name, and `vision`, DTPConfig overrides)}; or an OpenCLIP-format file,
    whose DTP settings then come from the command line."""
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and 'model' in ckpt and ('model_args' in ckpt or 'config' in ckpt):
        run = ckpt.get('config') or {}
        if run.get('tome_r') or run.get('tome_cost'):  # its weights are the plain ViT's: counted here, it would be one
            raise SystemExit(f"{path} is a ToMe run's (tome_r={run.get('tome_r')}, tome_cost={run.get('tome_cost')}): "
                             f"--checkpoint measures DTP pooling; ToMe's counts are printed by --tome-r R or --tome-cost C")
        if 'model_args' in ckpt:
            arch = ckpt['model_args'].get('model_name', 'ViT-B-32')
            tower = load_openclip(**{**ckpt['model_args'], 'pretrained': None},
                                  tower=tower_class(ckpt['model_args'].get('boundary'))).visual
        else:
            config, names = ckpt['config'], {f.name for f in dataclasses.fields(DTPConfig)}
            fields = {k: v for k, v in {**config, **(config.get('vision') or {})}.items() if k in names}
            arch = config.get('model', 'custom')
            tower = load_openclip(arch, **fields).visual if arch in open_clip.list_models() \
                else DTPViT(DTPConfig(**fields))
        state = {strip_prefixes(k): v for k, v in ckpt['model'].items()}
        tower.load_state_dict({k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.')})
        return tower, arch
    if ratio is None:
        raise SystemExit(f"{path} is an OpenCLIP-format checkpoint: pass the compression it was trained "
                         f"at as a single --ratio R (and --model, --pre-layers if not the defaults)")
    overrides = {k: v for k, v in dict(image_size=image_size, pre_layers=pre_layers).items() if v is not None}
    return load_openclip(model, path, boundary='gumbel', compression=ratio, **overrides).visual, model


@torch.no_grad()
def checkpoint_rows(args, device):
    ratio = args.ratio[0] if args.ratio and len(args.ratio) == 1 else None
    with user_error(f'--checkpoint {args.checkpoint}'):
        tower, arch = load_tower(args.checkpoint, args.model, ratio, args.pre_layers, args.image_size)
    if args.eval_boundaries:
        tower.cfg.eval_boundaries = args.eval_boundaries
    tower = tower.to(device).eval()
    cfg, N = tower.cfg, tower.cfg.n_patches
    paths = sorted(p for p in Path(args.data).rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise SystemExit(f"no images under {args.data}")
    transform = open_clip.image_transform(cfg.image_size, is_train=False)
    # On the shapes val images the objects are known: also measure how well segments follow them.
    objects = data.shapes_object_patches(paths, transform, cfg.patch_size)

    def batches(unreadable):
        """(images, their indices in paths) per batch; the files that do not decode skipped, into unreadable."""
        for i in range(0, len(paths), args.batch_size):
            images, kept = [], []
            for j, p in enumerate(paths[i:i + args.batch_size], start=i):
                try:
                    images.append(transform(data.load_image(p)))  # as training decodes them (16-bit PNGs included)
                    kept.append(j)
                except Exception as e:  # any file that does not decode, as data.SkippingImageFolder skips in training
                    unreadable.append(f'{p} ({type(e).__name__})')
            if images:
                yield torch.stack(images).to(device), kept

    if cfg.eval_boundaries == 'threshold' and hasattr(tower, 'calibrate'):  # routers.py's router: as evaluation
        tower.calibrate(images for images, _ in batches([]))  # in the training scripts, calibrated on these images
    quality = defaultdict(float)
    segments, padded = [], []  # per image: its segment count, and its batch's maximum
    unreadable = []  # skipped and counted, as training does
    for images, kept in batches(unreadable):
        _, aux = tower(images)
        counts = aux['n_segments'].tolist()
        segments += counts
        padded += [max(counts)] * len(counts)
        if objects is not None:
            sums = segment_quality(aux['segment_ids'], objects[kept].to(device))
            if 'boundary_logits' in aux:
                sums.update(boundary_confidence(aux['boundary_logits'], aux['boundaries']))
            for k, v in sums.items():
                quality[k] += v
    if unreadable:
        print(f'{len(unreadable)} unreadable images skipped, e.g. {unreadable[0]}', file=sys.stderr)
    if not segments:
        raise SystemExit(f'no readable image under {args.data}')
    plain = plain_config(cfg)
    params = sum(p.numel() for n, p in tower.named_parameters() if not is_new(n))  # the plain ViT's
    common = dict(arch=arch, image_size=cfg.image_size, pre_layers=cfg.pre_layers, images=len(segments),
                  unreadable=len(unreadable),
                  batch_size=args.batch_size, eval_boundaries=cfg.eval_boundaries)
    rows = [dict(common, pooling='none', measure='closed form', ratio=1.0, tokens=N + 1, gmacs=gmacs(plain),
                 params=params)]
    ideal = statistics.fmean(gmacs(cfg, s) for s in segments)
    run = statistics.fmean(padded_gmacs(cfg, s, p) for s, p in zip(segments, padded))
    for measure, counts, g in (('per image (ideal)', segments, ideal), ('padded batches', padded, run)):
        rows.append(dict(common, pooling='dtp', measure=measure, ratio=N / statistics.fmean(counts),
                         tokens=1 + statistics.fmean(counts), gmacs=g, params=n_params(tower)))
    for row in rows:
        row.update(gflops=2 * row['gmacs'], rel_cost=row['gmacs'] / rows[0]['gmacs'])
    if quality:
        rows[1].update(segment_purity=quality['pure'] / quality['segments'],
                       object_tokens=quality['object_tokens'] / max(1, quality['images_with_object']))
        if 'prob_std' in quality:
            rows[1].update(boundary_prob_std=quality['prob_std'] / len(segments),
                           boundary_margin=quality['margin'] / max(1, quality['images_with_margin']))
    return rows, cfg, segments


# -----------------------------------------------------------------------------------------------
# --bench: what the FLOP savings buy in wall-clock time and memory

def bench_towers(base, ratios, tome_rs=()):
    """The plain ViT, a gumbel DTP-ViT per ratio (trained on the paper's Bernoulli samples), and ToMe per r of
    tome_rs, with the same weights (only the predictor is new)."""
    torch.manual_seed(0)
    plain = DTPViT(base)
    towers = [(None, plain)]
    for r in ratios:
        tower = DTPViT(dataclasses.replace(base, boundary='gumbel', compression=r))
        missing, unexpected = tower.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and all(k.startswith('predictor.') for k in missing), (missing, unexpected)
        towers.append((r, tower))
    for r in tome_rs:  # ToMe runs a copy of the plain ViT itself
        towers.append((r, tome.patch(copy.deepcopy(plain), r)))
    return towers


def rss_kb(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def peak_memory_gb(run, tower, device):
    """Peak memory of `run` (two training steps from a fresh optimizer): the tower's weights plus the
    peak growth above what was allocated before (grads, AdamW state, activations).
    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak RSS (VmHWM), reset to the current
    RSS through /proc/self/clear_refs after malloc_trim has returned freed heap pages to the OS, so
    memory freed by earlier rows is neither reused unseen nor counted."""
    weights = sum(p.numel() * p.element_size() for p in tower.parameters())
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (weights + torch.cuda.max_memory_allocated() - before) / 1e9
    try:
        gc.collect()
        ctypes.CDLL('libc.so.6').malloc_trim(0)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        before = rss_kb('VmRSS')
    except OSError:  # not Linux/glibc: no sound measurement
        run()
        return float('nan')
    run()
    return (weights + (rss_kb('VmHWM') - before) * 1024) / 1e9


def bench_rows(args, base, ratios, device, tome_rs=()):
    cuda = device == 'cuda'
    autocast = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batch, N = args.batch_size, base.n_patches
    images = torch.randn(batch, 3, base.image_size, base.image_size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    towers = [(r, t.to(device)) for r, t in bench_towers(base, ratios, tome_rs)]

    def interleaved(fns, warmup):
        """Median seconds of each fn, timed round-robin so that background load hits every row alike."""
        for fn in fns:
            for _ in range(warmup):
                fn()
        times = [[] for _ in fns]
        for _ in range(args.repeats):
            for fn, ts in zip(fns, times):
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t0)
        return [statistics.median(ts) for ts in times]

    # Inference: eval mode, the predictor's deterministic top-k boundaries (round(N / r) segments).
    eval_segments = []
    for _, tower in towers:
        with torch.no_grad(), autocast():
            eval_segments.append(int(tower.eval()(images)[1]['n_segments'].max()))

    def infer(tower):
        def fn():
            with torch.no_grad(), autocast():
                tower(images)
        return fn
    infer_s = interleaved([infer(t) for _, t in towers], warmup=2)

    # Training: train mode, Gumbel-sampled boundaries (with the paper's Bernoulli samples segment counts vary
    # per image; top-k samples give every image round(N / r), the count evaluation keeps); one step = forward,
    # a loss on the features (a stand-in for the contrastive loss) + the boundary loss, backward, AdamW.
    steps, train_segments, memory = [], [], []
    for _, tower in towers:
        tower.train()
        opt = torch.optim.AdamW(tower.parameters(), lr=1e-5, fused=True)
        segs = []

        def step(tower=tower, opt=opt, segs=segs):
            with autocast():
                features, aux = tower(images)
            loss = features.float().square().mean() + aux['boundary_loss']
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            segs.append(aux['n_segments'].float().mean())
        memory.append(peak_memory_gb(lambda: (step(), step()), tower, device))  # also the warm-up
        steps.append(step)
        train_segments.append(segs)
    train_s = interleaved(steps, warmup=0)

    rows = []
    for (r, tower), s_eval, t_inf, t_train, segs, mem in zip(towers, eval_segments, infer_s, train_s,
                                                             train_segments, memory):
        cfg = tower.cfg
        pooling = 'tome' if hasattr(tower, 'tome_r') else 'none' if r is None else 'dtp'
        cost = tome_gmacs(base, r) if pooling == 'tome' else gmacs(cfg, s_eval)
        ideal = gmacs(base) / cost  # the FLOP ratio at the segments (tokens) inference ran
        ratio = None if pooling == 'tome' else 1.0 if r is None else float(r)
        rows.append(dict(arch=args.model, pooling=pooling, ratio=ratio, **({'tome_r': r} if pooling == 'tome' else {}),
                         bench_tokens=1 + s_eval, bench_gmacs=cost, params=n_params(tower),
                         train_tokens=1 + statistics.fmean(float(s) for s in segs),
                         throughput=batch / t_inf, train_step_s=t_train, peak_mem_gb=mem, ideal=ideal,
                         device=device, batch_size=batch, repeats=args.repeats,
                         mode={'none': 'plain ViT', 'tome': 'ToMe: the same merges in inference and training',
                               'dtp': 'inference: eval, top-k boundaries; training: Gumbel boundaries'}[pooling]))
    for row in rows:
        row['speedup'] = row['throughput'] / rows[0]['throughput']
        row['train_speedup'] = rows[0]['train_step_s'] / row['train_step_s']
    return rows


BENCH_COLUMNS = [
    ('arch', lambda r: r['arch']),
    ('ratio', lambda r: '-' if r['pooling'] == 'none' else
     format_r(r['tome_r']) if r['pooling'] == 'tome' else f"{r['ratio']:g}"),
    ('tokens', lambda r: f"{r['bench_tokens']:g}"), ('img/s', lambda r: f"{r['throughput']:.1f}"),
    ('speedup', lambda r: f"{r['speedup']:.2f}x"), ('ideal', lambda r: f"{r['ideal']:.2f}x"),
    ('quotient', lambda r: f"{r['speedup'] / r['ideal']:.0%}"),
    ('| train tokens', lambda r: f"| {r['train_tokens']:.1f}"),
    ('s/step', lambda r: f"{r['train_step_s']:.3f}"), ('speedup ', lambda r: f"{r['train_speedup']:.2f}x"),
    ('quotient ', lambda r: f"{r['train_speedup'] / r['ideal']:.0%}"),
    ('peak mem', lambda r: f"{r['peak_mem_gb']:.2f} GB"),
]


# -----------------------------------------------------------------------------------------------

def ratio(text):
    """--ratio: patches per segment, a number >= 1 (1: one segment per patch)."""
    try:
        r = float(text)
    except ValueError:
        r = None
    if r is None or not r >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a compression ratio: patches per segment, a number >= 1")
    return r


def tome_r_arg(text):
    """--tome-r: tokens merged per block, an int >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a ToMe r: tokens merged per block, an int >= 0")
    return int(text)


def rel_cost_arg(text):
    """--tome-cost: a fraction of the plain ViT's cost, in (0, 1]."""
    try:
        c = float(text)
    except ValueError:
        c = None
    if c is None or not 0 < c <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a relative cost: a fraction of the plain ViT's, in (0, 1]")
    return c


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='ViT-B-32', help='OpenCLIP ViT config (default ViT-B-32)')
    parser.add_argument('--ratio', type=ratio, nargs='+', help='compression ratios (default 1 2 4 10)')
    parser.add_argument('--image-size', type=int, help="input resolution (default: the config's)")
    parser.add_argument('--pre-layers', type=int, help='full-length blocks before pooling (default 2)')
    parser.add_argument('--tome-r', type=tome_r_arg, nargs='+', help='also ToMe (tome.py) rows: r tokens merged per block')
    parser.add_argument('--tome-cost', type=rel_cost_arg, nargs='+',
                        help="also ToMe rows at the schedule whose cost is nearest this fraction of the plain ViT's "
                             "(e.g. 0.6 0.42: DTP's 2x and 4x on ViT-B-32)")
    parser.add_argument('--json', action='store_true', help='print the rows as one JSON list')
    parser.add_argument('--bench', action='store_true', help='also measure throughput, train step, memory')
    parser.add_argument('--batch-size', type=int, help='bench/checkpoint batch (default 32 on CPU, 256 on CUDA)')
    parser.add_argument('--repeats', type=int, default=5, help='bench: timed repeats per row (median)')
    parser.add_argument('--threads', type=int, help="bench: torch.set_num_threads (default: torch's, one per core)")
    parser.add_argument('--checkpoint', help='training checkpoint, or OpenCLIP-format file (needs --data)')
    parser.add_argument('--data', help='directory of images (searched recursively) for --checkpoint')
    parser.add_argument('--eval-boundaries', choices=['topk', 'threshold'],
                        help="--checkpoint: override the checkpoint's eval rule (topk: round(N/r) per image)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f'--batch-size {args.batch_size}: must be >= 1')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    args.batch_size = args.batch_size or (256 if device == 'cuda' else 32)
    say = (lambda *a: None) if args.json else print
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint or args.data:
        if not (args.checkpoint and args.data):
            parser.error('--checkpoint and --data go together')
        if args.tome_r or args.tome_cost:
            parser.error('--tome-r and --tome-cost add rows to the FLOP table, not to --checkpoint')
        rows, cfg, segments = checkpoint_rows(args, device)
        say(f"{args.checkpoint}: {rows[0]['arch']} (width {cfg.width}, {cfg.pre_layers}+{cfg.short_layers} layers, "
            f"patch {cfg.patch_size}, {cfg.image_size}px, {cfg.n_patches} patches), boundary {cfg.boundary}, "
            f"compression {cfg.compression:g}, eval boundaries {cfg.eval_boundaries}")
        say(f"{len(segments)} images under {args.data}, batch {args.batch_size}; segments per image: min "
            f"{min(segments)}, mean {statistics.fmean(segments):.2f}, max {max(segments)}")
        say("GMACs from the closed form (fvcore's convention: 1 multiply-add = 1 FLOP; GFLOPs = 2 x GMACs): "
            "per image from its own segment count, padded from its batch's largest")
        say()
        if not args.json:
            print_table([('arch', lambda r: r['arch']), ('pooling', lambda r: r['pooling']),
                         ('measure', lambda r: r['measure']), ('compression', lambda r: f"{r['ratio']:.2f}"),
                         *FLOP_COLUMNS[3:8]], rows)
        if 'segment_purity' in rows[1]:
            q = rows[1]
            say(f"\nsegment quality on the shapes val objects: segment_purity {q['segment_purity']:.3f} (share of "
                f"segments all object or all background), object_tokens {q['object_tokens']:.3f} (segments "
                f"touching the object per object patch)")
            if 'boundary_prob_std' in q:
                say(f"predictor: boundary_prob_std {q['boundary_prob_std']:.3f} (std of p over an image's "
                    f"patches), boundary_margin {q['boundary_margin']:.3f} (mean p of chosen boundaries - rest)")
    else:
        ratios = args.ratio or [1, 2, 4, 10]
        rows, base, uncounted = flop_rows(args.model, ratios, args.image_size, args.pre_layers)
        N = base.n_patches
        tome_rs = (args.tome_r or []) + [tome_r_for_cost(base, c, per_block=True) for c in args.tome_cost or []]
        if tome_rs:
            more, more_uncounted = tome_rows(base, tome_rs, rows[0]['macs'], dict(
                arch=args.model, image_size=base.image_size, pre_layers=base.pre_layers))
            rows, uncounted = rows + more, sorted(set(uncounted) | more_uncounted)
        say(f"{args.model} image tower at {base.image_size}x{base.image_size}: {N} patches + [CLS], "
            f"{base.pre_layers} full-length + {base.short_layers} shortened layers; per image")
        say("fvcore FlopCountAnalysis with attention handles. GMACs = fvcore's count (1 multiply-add = 1 FLOP); "
            "GFLOPs = 2 x GMACs, as OpenCLIP and most papers quote")
        say(f"DTP at ratio r: the gumbel model, predictor included, on evenly spaced boundaries giving "
            f"round({N}/r) segments (what evaluation keeps); tokens = tokens in the shortened layers, [CLS] included")
        if tome_rs:
            say(f"ToMe (tome.py) on the plain ViT, every block: r tokens merged after each block's attention "
                f"(at most (L - 1) // 2); tokens = tokens reaching ln_post; predictor+pool = the matching's "
                f"similarity matmuls")
        say()
        if not args.json:
            print_table(FLOP_COLUMNS, rows)
        say(f"\nnot counted (element-wise): {', '.join(op.replace('aten::', '') for op in uncounted)}")
        if args.bench:
            bench = bench_rows(args, base, ratios, device, tome_rs)
            for row, b in zip(rows, bench):
                row.update(b)
            precision = 'bf16 autocast' if device == 'cuda' else 'fp32'
            say(f"\nbench on {device} ({torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}"
                f", {precision}), batch {args.batch_size}, median of {args.repeats} repeats timed round-robin; "
                f"same weights and inputs in every row")
            say("DTP rows run the real predictor: inference in eval mode (top-k boundaries, round(N/r) segments); "
                "training in train mode (the paper's Gumbel-sampled boundaries: train tokens is their mean;")
            say("  the blocks pack the real tokens, attention alone runs padded to the batch's largest count; with "
                "bernoulli samples the untrained predictor's segment counts vary as much as a given rate allows)")
            if tome_rs:
                say("ToMe rows run a copy of the plain ViT's weights with its merges (tome.py); tokens = tokens "
                    "reaching ln_post")
            say("train step = forward + loss on the features + boundary loss + backward + AdamW (fused); "
                "ideal = FLOP ratio at the inference segment count; quotient = measured speedup / ideal")
            say("peak mem = weights + peak growth over two training steps from a fresh optimizer: " +
                ("torch.cuda.max_memory_allocated" if device == 'cuda' else
                 "process RSS (VmHWM after a /proc/self/clear_refs reset and malloc_trim)"))
            say()
            if not args.json:
                print_table(BENCH_COLUMNS, bench)
    if args.json:
        print(json.dumps(rows, indent=1))
    return rows


if __name__ == '__main__':
    main()
