"""
DTP-ViT: a Vision Transformer with Dynamic Token Pooling, in one file.

    image -> conv patch embedding -> [CLS] + N patch tokens + position embedding -> ln_pre
      -> pre_layers full-length blocks                                    1 + N tokens
      -> boundary predictor: a logit per patch token -> 0/1 boundaries (b_t = 1 closes a segment)
      -> each segment of patches is mean-pooled into one token             1 + S tokens, S ~ N / compression
      -> short_layers blocks on [CLS] + segments (padded per batch, padding masked)
      -> ln_post -> [CLS] token (or masked mean of the segments) -> proj   -> image embedding

Dynamic Token Pooling: Nawrot et al., "Efficient Transformers with Dynamic Token Pooling" (ACL 2023).
Parameter names follow OpenCLIP's VisionTransformer, so an OpenCLIP checkpoint loads key for key (the
boundary predictor is the only new module); the text tower is OpenCLIP's own. docs/method.md describes the
algorithm and the original research code's mistakes that the comments below refer to. Research beyond the
paper lives beside this file, in routers.py (as ToMe in tome.py).
"""
import difflib
import math
import os
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import ClassVar, Optional

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
    pool: str = 'cls'              # image embedding: the 'cls' token or the 'mean' of the segments
    # dynamic token pooling
    boundary: str = 'gumbel'       # 'gumbel' (the paper's predictor), 'fixed' (evenly spaced) or 'none' (plain ViT)
    compression: float = 4.0       # target patches per segment; the boundary prior is 1 / compression
    temperature: float = 0.5       # Gumbel-Sigmoid temperature (it only scales the gradient, see below)
    eval_boundaries: str = 'topk'  # eval: 'topk' (round(N / compression) per image) or 'threshold' (p > 0.5)
    predictor_hidden: Optional[int] = None  # hidden size of the boundary predictor (None: width)

    BOUNDARIES: ClassVar[tuple] = ('gumbel', 'fixed', 'none')

    def __post_init__(self):
        choices = dict(boundary=self.BOUNDARIES, eval_boundaries=('topk', 'threshold'), pool=('cls', 'mean'))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"DTPConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
        if self.eval_boundaries == 'threshold' and not self.learned:
            raise ValueError(f"DTPConfig.eval_boundaries='threshold' needs a learned predictor (boundary="
                             f"{self.boundary!r} has no probabilities to threshold)")
        if self.pre_layers < 0 or self.short_layers < 0:
            raise ValueError(f"DTPConfig: pre_layers={self.pre_layers}, short_layers={self.short_layers} must be >= 0")
        if not self.compression >= 1:
            raise ValueError(f"DTPConfig.compression={self.compression}: patches per segment must be >= 1")
        if not self.temperature > 0:  # Gumbel-Sigmoid divides by it: 0 gives NaN, < 0 inverts the boundaries
            raise ValueError(f"DTPConfig.temperature={self.temperature}: must be > 0")
        if self.width % self.heads or self.image_size % self.patch_size:
            raise ValueError(f"DTPConfig: width {self.width} must be divisible by heads {self.heads}, and image_size "
                             f"{self.image_size} by patch_size {self.patch_size}")

    @property
    def learned(self):
        """Whether a learned boundary predictor cuts the segments (it is then DTP's one new module)."""
        return self.boundary == 'gumbel'

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_segments(self):
        """N / compression rounded half up, at least 1: the one rule of fixed pooling, top-k eval and flops.py."""
        return min(self.n_patches, max(1, math.floor(self.n_patches / self.compression + 0.5)))


# ----------------------------------------------------------------------------------------------
# Transformer block, with the parameter names of OpenCLIP's ResidualAttentionBlock

class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, by F.scaled_dot_product_attention
    (fused kernels on CPU and GPU, and the padding mask of the pooled sequence). With `packing` (see Packing)
    x holds only the real tokens, and the padded layout exists only in here."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention initialises them
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, packing=None):
        """x: (B, L, D), or (T, D) real tokens when packed."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv, mask = (qkv, None) if packing is None else (packing.unpack(qkv), packing.attn_mask)
        B, L, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if mask is not None and mask.dtype != torch.bool:  # an additive float mask must match q's dtype (autocast)
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

    def forward(self, x, packing=None):
        x = x + self.attn(self.ln_1(x), packing)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------
# Boundaries. b is (B, N) over the patch tokens, b_t = 1 where patch t is the LAST of its segment.
# Every function returns exact 0/1 values; only the Gumbel one also carries a gradient.

def gumbel_sigmoid(logits, temperature, eps=1e-6):
    """Hard Bernoulli(sigmoid(logits)) samples with the Gumbel-Sigmoid straight-through gradient."""
    u = torch.rand_like(logits).clamp(eps, 1 - eps)  # clamped: log(0) would be -inf
    soft = torch.sigmoid((logits + (torch.log(u) - torch.log1p(-u))) / temperature)
    # soft > 0.5 iff logits + logistic noise > 0: an exact Bernoulli draw whatever the temperature,
    # which only sharpens the gradient. Straight-through: the value of `hard`, the gradient of `soft`.
    hard = (soft > 0.5).float()
    return hard + (soft - soft.detach())


def topk_boundaries(logits, k):
    """Exactly k boundaries per image at the most probable positions (the last patch is one of them)."""
    logits = torch.cat([logits[:, :-1], torch.full_like(logits[:, -1:], float('inf'))], dim=1)
    return torch.zeros_like(logits).scatter_(1, logits.topk(k, dim=1).indices, 1.0)


def fixed_boundaries(batch, n, n_segments, device=None):
    """Evenly spaced boundaries cutting n patches into exactly n_segments segments."""
    seg = torch.arange(n, device=device) * n_segments // n  # segment id of each patch: 0 .. n_segments-1
    b = torch.ones(n, device=device)
    b[:-1] = (seg[1:] != seg[:-1]).float()
    return b.expand(batch, n)


def boundary_prior_loss(b, prior):
    """-log Binomial(k = sum_t b_t; n = N, p = prior) / N, averaged over the batch, on the straight-through
    boundaries, so that k carries a gradient (lgamma is smooth in k; a loss on round(sum(soft)) has none)."""
    n, k = b.shape[1], b.sum(dim=1)
    p = min(max(prior, 1e-6), 1 - 1e-6)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))
    return (-log_pmf / n).mean()


def segment_ids(b):
    """Segment index of every patch: the number of boundaries strictly before it."""
    return b.cumsum(dim=1) - b


def pool_segments(x, b, count=None):
    """Mean-pool each segment of x (B, N, D) cut by the boundaries b (B, N). Returns the segments (B, S, D),
    zero-padded to the batch's largest count S; `real` (B, S), True on real segments (None: no padding); the
    sizes (B, S), patches per segment, which carry b's gradient. count: every image's segment count where the
    caller knows it (top-k, evenly spaced). Otherwise it is read from b, and the host waits for the GPU: on an
    H200 the forward then became bound by Python's kernel launches, which ate most of the speedup (docs/speed.md)."""
    n_segments = b.detach().sum(dim=1)  # exact: the last patch of every image closes a segment
    if count is None:
        lo, hi = (int(v) for v in torch.stack([n_segments.min(), n_segments.max()]).tolist())  # one host sync
    else:
        torch._assert_async(n_segments.eq(count).all(), 'pool_segments: a segment count is not the one given')
        lo = hi = count
    seg = segment_ids(b)  # a whole number in value, but it carries b's gradient
    dist = torch.arange(hi, device=x.device) - seg.unsqueeze(-1)  # (B, N, S), in seg's float dtype
    # The DTP paper's trick: weight 1 - dist where dist == 0 (patch t lies in segment s), else 0: the 0/1 membership
    # in value, d weight / d seg = 1 in gradient, so the task loss reaches the predictor (== alone sends it none).
    w = torch.where(dist.detach() == 0, 1 - dist, torch.zeros_like(dist))
    sizes = w.sum(dim=1)
    # The mean, divided by the size with its gradient as the paper's code does, so that a one-patch segment's mean
    # does not depend on its weight (clamp(min=1) has no gradient at 1). Padding (size 0) is divided by 1.
    w = w / (sizes + (sizes.detach() == 0)).unsqueeze(1)
    pooled = torch.einsum('bns,bnd->bsd', w.to(x.dtype), x)
    real = None if lo == hi else sizes.detach() > 0  # a real segment holds a patch, padding none
    return pooled, real, sizes


class Packing:
    """The real tokens of a padded batch, packed. Padding must never be attended to (a key-padding mask) and need
    not be computed either: LayerNorms, projections and MLPs (nearly all the FLOPs) run on the T real tokens as
    (T, D); only attention sees the (B, L) layout. Computing the padding cost 20-25% of a sampled-count step."""

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


def join(cls, segments, real):
    """[CLS] (B, 1, D) in front of the pooled segments (B, S, D), packed to (T, D) with its Packing when
    the images' segment counts differ (real: see pool_segments), else (B, 1 + S, D) and None."""
    x = torch.cat([cls, segments], dim=1)  # [CLS] is never pooled
    if real is None:
        return x, None
    packing = Packing(F.pad(real, (1, 0), value=True))  # [CLS] is always real
    return packing.pack(x), packing


def float32_call(module, x):
    """module(x) in float32, also in a model cast to half precision (its weights upcast for the call, gradients
    still reaching them); float32 weights are used as they are (fvcore's trace then sees the module)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module(x.float())
    weights = {name: p.float() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, weights, (x.float(),))


def boundary_aux(b, cfg, logits=None):
    """forward()'s aux for the boundaries b (B, N): the boundary prior loss (0 without a learned predictor), each
    image's segment count, b, every patch's segment, the batch's patches per segment, the logits if any."""
    n_segments = b.detach().sum(dim=1).long()
    prior = boundary_prior_loss(b, 1 / cfg.compression) if cfg.learned else b.new_zeros(())
    aux = dict(boundary_loss=prior, n_segments=n_segments, boundaries=b.detach(),
               segment_ids=segment_ids(b.detach()).long(), compression=b.shape[1] / n_segments.float().mean())
    return aux if logits is None else dict(aux, boundary_logits=logits)


class DTPViT(nn.Module):
    config_class = DTPConfig  # what load_openclip builds this tower's config from (routers.py has its own)

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
        if cfg.learned:
            self.predictor = self.boundary_predictor(width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def boundary_predictor(self, reads):
        """DTP's one new module: LayerNorm -> Linear -> GELU -> Linear, a boundary logit from `reads` features."""
        cfg = self.cfg
        hidden = cfg.predictor_hidden or cfg.width
        predictor = nn.Sequential(nn.LayerNorm(reads), nn.Linear(reads, hidden), nn.GELU(), nn.Linear(hidden, 1))
        # Start at the target rate: N / compression boundaries per image, one of which is the
        # last patch's (always a boundary), so the other N - 1 patches get the rest.
        N = cfg.n_patches
        p = min(max((N / cfg.compression - 1) / max(N - 1, 1), 1e-6), 1 - 1e-6)
        nn.init.constant_(predictor[-1].bias, math.log(p / (1 - p)))
        return predictor

    def forward(self, images, boundaries=None):
        """images (B, 3, H, W) -> (features (B, embed_dim), aux: boundary_loss, n_segments (B,), boundaries and
        segment_ids (B, N), compression, boundary_logits (B, N) with a predictor). boundaries: an optional
        (B, N) 0/1 tensor used instead of the predicted ones (flops.py simulates a ratio with it); the
        predictor still runs, so its cost stays in the graph."""
        blocks = self.transformer.resblocks
        x = self.embed(images)                                   # (B, 1 + N, D)
        for block in blocks[:self.cfg.pre_layers]:
            x = block(x)                                         # full length
        b, count, logits = self.segment(x[:, 1:], boundaries)    # (B, N): b_t = 1 closes a segment
        x, packing = self.pool(x, b, count)                      # (B, 1 + S, D), or (T, D) packed
        for block in blocks[self.cfg.pre_layers:]:
            x = block(x, packing)                                # the shortened layers
        return self.head(x, packing), boundary_aux(b, self.cfg, logits)

    def embed(self, images):
        """Patch embedding, [CLS] in front, position embedding, ln_pre: as OpenCLIP."""
        size = self.cfg.image_size
        if images.ndim != 4 or tuple(images.shape[-2:]) != (size, size):
            # the convolution would run on any size: larger images silently lose their right and bottom edges
            raise ValueError(f"DTPViT takes (B, 3, {size}, {size}) images, got {tuple(images.shape)}; resize "
                             f"them to {size} px (or build the model with that image_size)")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.emb_dropout(x))

    def segment(self, patches, boundaries=None):
        """The patch tokens after the pre-layers (B, N, D) -> boundaries b (B, N), every image's segment
        count where the rule fixes it (None where it varies), and the predictor's logits (B, N) or None."""
        cfg = self.cfg
        B, N, _ = patches.shape
        logits, count = None, cfg.n_segments  # evenly spaced and top-k cuts: exactly n_segments per image
        if cfg.boundary == 'fixed':
            b = fixed_boundaries(B, N, count, patches.device)
        elif cfg.boundary == 'gumbel':
            # float32 even under autocast: in fp16 the relaxed-Bernoulli probabilities became NaN.
            with torch.autocast(patches.device.type, enabled=False):
                logits = float32_call(self.predictor, patches).squeeze(-1)
            if self.training:
                b, count = gumbel_sigmoid(logits, cfg.temperature), None
            elif cfg.eval_boundaries == 'topk':  # eval draws no noise: an image always gets the same segments
                b = topk_boundaries(logits, count)
            else:
                b, count = (logits > 0).float(), None
        else:  # the plain ViT: every patch is its own segment, and nothing is pooled
            if boundaries is not None:
                raise ValueError("boundary='none' pools nothing: build the tower with 'fixed' to pool given boundaries")
            b, count = patches.new_ones(B, N, dtype=torch.float32), N
        if boundaries is not None:
            b, count = boundaries.to(device=patches.device, dtype=torch.float32), None
        # The last patch always closes a segment, so no patch is ever left out of the pooling.
        return torch.cat([b[:, :-1], b.new_ones(B, 1)], dim=1), count, logits

    def pool(self, x, b, count=None):
        """[CLS] + N patch tokens (B, 1 + N, D) -> [CLS] + the mean of each segment's patches, and their Packing
        where the images' segment counts differ (see join). The plain ViT returns x as it is."""
        if self.cfg.boundary == 'none':
            return x, None
        segments, real, _ = pool_segments(x[:, 1:], b, count)
        return join(x[:, :1], segments, real)

    def head(self, x, packing=None):
        """ln_post, then the [CLS] token (or the mean of the real segments), then proj."""
        if packing is not None:
            x = packing.unpack(x)
        if self.cfg.pool == 'cls':
            x = self.ln_post(x[:, 0])
        else:  # the mean of the real segments (of all patches for the plain ViT)
            tokens = self.ln_post(x[:, 1:])
            real = None if packing is None else packing.attn_mask[:, 0, 0, 1:].unsqueeze(-1)
            x = tokens.mean(dim=1) if real is None else tokens.masked_fill(~real, 0).sum(1) / real.sum(1)
        return x @ self.proj


class CLIP(nn.Module):
    """A DTP-ViT image tower and OpenCLIP's own text tower, laid out as OpenCLIP's CustomTextCLIP (visual.*,
    text.*, logit_scale). text_cfg: a dict or open_clip.CLIPTextCfg; tower: the image tower's class."""

    def __init__(self, vision_cfg: DTPConfig, text_cfg, tower=DTPViT):
        super().__init__()
        self.visual = tower(vision_cfg)
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

# OpenCLIP vision options this ViT does not implement: a config that turns one on is refused, not built without it.
_SUPPORTED_VISION_KEYS = {'image_size', 'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size', 'pool_type'}
_OFF_VALUES = (None, False, 0, 0.0, '', 'learnable', 'default', 'tok')


def _checkpoint_file(model_name, pretrained):
    if os.path.isfile(pretrained):
        return pretrained
    pretrained_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not pretrained_cfg:
        raise FileNotFoundError(f"pretrained={pretrained!r} is neither a file nor an OpenCLIP tag of {model_name} "
                                f"(its tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
    try:
        return open_clip.download_pretrained(pretrained_cfg)
    except Exception as e:
        raise RuntimeError(f"could not fetch OpenCLIP weights {model_name}/{pretrained} ({type(e).__name__}: {e}). "
                           f"Without internet, download the checkpoint elsewhere and pass the local file: "
                           f"load_openclip({model_name!r}, '/path/to/open_clip_pytorch_model.bin')") from e


# Hyperparameters that OpenAI's CLIP stores in its state dict: not weights (OpenCLIP drops them too).
_OPENAI_ENTRIES = ('input_resolution', 'context_length', 'vocab_size')


def _is_torchscript(path):
    """A TorchScript archive is a zip with a constants.pkl record (torch.jit.save's layout)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split('/', 1)[-1] == 'constants.pkl' for name in archive.namelist())


def read_checkpoint(path):
    """What a checkpoint file holds, on the CPU: a torch.save'd object (weights_only=True), a .safetensors file, or
    a TorchScript archive's (OpenAI's CLIP) state dict. Any other file is a ValueError naming it."""
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


def _state_dict(obj, path):
    """The weights of any checkpoint form, under OpenCLIP's key names (a state dict, OpenCLIP's {'state_dict':
    ...}, this project's {'model': ...}; DDP's and torch.compile's prefixes removed), and whether it is OpenAI's."""
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    elif isinstance(obj, dict) and 'model_args' in obj:  # this project's train_clip.py / train_cls.py
        obj = obj['model']
    if not (isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values())):
        raise ValueError(f"{path} holds no state dict of weights (found {type(obj).__name__}"
                         f"{' with keys ' + str(list(obj)[:8]) if isinstance(obj, dict) else ''})")
    state_dict = {re.sub(r'^((module|_orig_mod)\.)+', '', k): v for k, v in obj.items()}  # DDP, torch.compile
    openai = any(k in state_dict for k in _OPENAI_ENTRIES)
    return {k: v for k, v in state_dict.items() if k not in _OPENAI_ENTRIES}, openai


def load_openclip(model_name='ViT-B-32', pretrained=None, text=None, tower=DTPViT, **overrides) -> CLIP:
    """A DTP-ViT CLIP with the architecture of an OpenCLIP ViT config ('ViT-B-32', 'ViT-L-14', ...) and,
    given `pretrained` (a checkpoint file, or an OpenCLIP tag such as 'laion2b_s34b_b79k' or 'openai', which
    open_clip downloads), its weights: OpenCLIP's files (raw, .safetensors or its training checkpoint),
    OpenAI's (TorchScript or state dict: QuickGELU, as trained) or this project's ckpt.pt. overrides: fields
    of the tower's config (compression=10, boundary='none', ...); text: OpenCLIP text_cfg overrides; tower:
    DTPViT or a subclass with its own config_class (routers.RouterViT). short_layers defaults to the depth
    (the checkpoint's, with weights) minus pre_layers, and with weights the two must add up to it."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
        raise ValueError(f"unknown OpenCLIP model {model_name!r}; close matches: {close}")
    vision = cfg['vision_cfg']
    unsupported = {k: v for k, v in vision.items() if k not in _SUPPORTED_VISION_KEYS and v not in _OFF_VALUES}
    if unsupported or not isinstance(vision.get('layers'), int) or vision.get('pool_type', 'tok') not in ('tok', 'avg'):
        raise ValueError(f"{model_name} is not a plain OpenCLIP ViT; this DTP-ViT does not implement: "
                         f"{unsupported or {k: vision.get(k) for k in ('layers', 'pool_type')}}")
    for given, what, cls, error in ((overrides, f'{tower.config_class.__name__} field', tower.config_class, TypeError),
                                    (text or {}, 'text_cfg key', open_clip.CLIPTextCfg, ValueError)):
        names = {f.name for f in fields(cls)}
        for key in set(given) - names:
            raise error(f"load_openclip: unknown {what} {key!r}; close matches: "
                        f"{difflib.get_close_matches(key, names)}")

    quick_gelu = cfg.get('quick_gelu', False)
    depth, width = vision['layers'], vision['width']
    hint = ''
    if pretrained:
        path = _checkpoint_file(model_name, pretrained)
        checkpoint = read_checkpoint(path)
        state_dict, openai = _state_dict(checkpoint, path)
        own = isinstance(checkpoint, dict) and 'model_args' in checkpoint  # this project's checkpoint
        if own:
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
    vision_cfg = tower.config_class(**{
        **dict(image_size=image_size if isinstance(image_size, int) else image_size[0],
               patch_size=vision['patch_size'], width=width, heads=width // vision.get('head_width', 64),
               mlp_ratio=vision.get('mlp_ratio', 4.0), embed_dim=cfg['embed_dim'], quick_gelu=quick_gelu,
               pool='mean' if vision.get('pool_type') == 'avg' else 'cls',
               pre_layers=pre_layers, short_layers=short_layers),
        **overrides})
    model = CLIP(vision_cfg, {**cfg['text_cfg'], **(text or {})}, tower)
    if pretrained:
        _load_weights(model, state_dict, path, hint, own)
    return model


# The modules of OpenCLIP's VisionTransformer. Any other module of a tower is DTP's own (the predictor, a
# subclass's additions): it keeps its initialisation on OpenCLIP weights, and flops.py counts it apart.
OPENCLIP_VISUAL = ('conv1', 'class_embedding', 'positional_embedding', 'ln_pre', 'transformer', 'ln_post', 'proj')


def is_new(name):
    """Whether a parameter of the image tower (named without 'visual.') is DTP's own, not OpenCLIP's."""
    return name.split('.', 1)[0] not in OPENCLIP_VISUAL


def _load_weights(model, state_dict, path, hint='', own=False):
    """Every weight must find its place: a checkpoint key the model lacks, a model weight (not DTP's own) the
    checkpoint lacks, or a shape that differs, is an error naming them. own: this project's checkpoint, whose
    DTP modules are dropped where the model has none (e.g. a DTP run evaluated as the plain ViT)."""
    state_dict = convert_to_custom_text_state_dict(state_dict)  # CLIP's flat text keys -> text.*
    resize_pos_embed(state_dict, model)  # only acts when the image size differs from the checkpoint's
    ours = model.state_dict()

    def dtp_own(key):
        return key.startswith('visual.') and is_new(key[len('visual.'):])
    state_dict = {k: v for k, v in state_dict.items() if k in ours or not (own and dtp_own(k))}
    missing = [k for k in ours if k not in state_dict and not dtp_own(k)]
    unexpected = [k for k in state_dict if k not in ours]
    shapes = [f'{k} {list(v.shape)} vs {list(ours[k].shape)}' for k, v in state_dict.items()
              if k in ours and v.shape != ours[k].shape]
    if missing or unexpected or shapes:
        def some(keys):  # a few names, not the thousands of a whole mismatched architecture
            return f"{keys[:5]}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}"
        raise KeyError(f"checkpoint {path} does not match the model: missing {some(missing)}, unexpected "
                       f"{some(unexpected)}, shapes (checkpoint vs model) {some(shapes)}{hint}")
    model.load_state_dict(state_dict, strict=False)
