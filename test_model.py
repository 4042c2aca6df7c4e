"""Tests of model.py. Real ViT-B-32 shapes where a test is about ViT-B-32, tiny configs elsewhere."""
import copy
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import model as M
from model import CLIP, DTPConfig, DTPViT, load_openclip

TEXT_TINY = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)


def tiny(**kw):
    """A small DTP-ViT: 64 patches of 4x4 pixels, width 32."""
    return DTPConfig(**{**dict(image_size=32, patch_size=4, width=32, heads=2, pre_layers=1, short_layers=2,
                               embed_dim=16, predictor_hidden=32), **kw})


@pytest.fixture(scope='module')
def openclip_b32(tmp_path_factory):
    """A randomly initialised OpenCLIP ViT-B-32, every weight perturbed (so a LayerNorm bias left at
    zero or a scale left at one cannot hide a mapping mistake), saved in three checkpoint formats."""
    torch.manual_seed(0)
    ref = open_clip.create_model('ViT-B-32').eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = tmp_path_factory.mktemp('ckpt')
    state_dict = ref.state_dict()
    torch.save(state_dict, d / 'raw.pt')
    torch.save({'state_dict': {'module.' + k: v for k, v in state_dict.items()}, 'epoch': 3}, d / 'ddp.pt')
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(d / 'model.safetensors'))
    images = torch.randn(3, 3, 224, 224)
    texts = open_clip.get_tokenizer('ViT-B-32')(['a dog', 'a small red circle in the top left corner', ''])
    with torch.no_grad():
        expected = ref.encode_image(images), ref.encode_text(texts)
    return d, images, texts, expected


# 1. equivalence with OpenCLIP ----------------------------------------------------------------

@pytest.mark.parametrize('fmt', ['raw.pt', 'ddp.pt', 'model.safetensors'])
def test_plain_vit_reproduces_openclip(openclip_b32, fmt):
    d, images, texts, (ref_image, ref_text) = openclip_b32
    model = load_openclip('ViT-B-32', str(d / fmt), boundary='none').eval()
    assert model.visual.cfg.heads == 12 and len(model.visual.transformer.resblocks) == 12
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(texts)
    assert (image - ref_image).abs().max() <= 1e-5
    assert (text - ref_text).abs().max() <= 1e-5
    assert ref_image.abs().max() > 1  # the comparison is not between two near-zero tensors


def test_gumbel_with_every_patch_a_boundary_reproduces_openclip(openclip_b32):
    d, images, texts, (ref_image, _) = openclip_b32
    model = load_openclip('ViT-B-32', str(d / 'raw.pt'), boundary='gumbel', compression=4).eval()
    with torch.no_grad():
        forced, aux = model.visual(images, boundaries=torch.ones(3, 49))
        # compression 1 asks for one segment per patch from the predictor's own top-k
        model.visual.cfg.compression = 1.0
        topk, aux1 = model.visual(images)
    assert aux['n_segments'].tolist() == [49] * 3 and aux1['n_segments'].tolist() == [49] * 3
    assert (forced - ref_image).abs().max() <= 1e-5
    assert (topk - ref_image).abs().max() <= 1e-5


def test_loader_maps_every_weight_and_names_what_is_wrong(openclip_b32, tmp_path):
    d, *_ = openclip_b32
    state_dict = torch.load(d / 'raw.pt', weights_only=True)
    model = load_openclip('ViT-B-32', str(d / 'raw.pt'), pre_layers=3)
    ours = model.state_dict()
    for k, v in state_dict.items():  # every checkpoint weight landed, bit for bit
        k = k if k.startswith('visual.') or k == 'logit_scale' else 'text.' + k
        assert torch.equal(ours[k], v), k
    assert model.visual.cfg.pre_layers == 3 and model.visual.cfg.short_layers == 9

    missing = {k: v for k, v in state_dict.items() if k != 'visual.ln_pre.bias'}
    torch.save(missing, tmp_path / 'missing.pt')
    with pytest.raises(KeyError, match=r'visual\.ln_pre\.bias'):
        load_openclip('ViT-B-32', str(tmp_path / 'missing.pt'))
    torch.save({**state_dict, 'visual.extra_token': torch.zeros(3)}, tmp_path / 'extra.pt')
    with pytest.raises(KeyError, match=r'visual\.extra_token'):
        load_openclip('ViT-B-32', str(tmp_path / 'extra.pt'))
    with pytest.raises(ValueError, match=r'must equal the depth'):
        load_openclip('ViT-B-32', str(d / 'raw.pt'), pre_layers=2, short_layers=8)
    small = load_openclip('ViT-B-32', pre_layers=1, short_layers=2, width=64, heads=2,
                          text=dict(width=32, heads=2, layers=1, context_length=16))  # no weights: any depth
    assert len(small.visual.transformer.resblocks) == 3 and small.text.context_length == 16
    with pytest.raises(TypeError, match=r"compresion.*compression"):
        load_openclip('ViT-B-32', compresion=4)
    with pytest.raises(ValueError, match=r"unknown text_cfg key 'contxt_length'.*context_length"):
        load_openclip('ViT-B-32', text=dict(contxt_length=16))
    with pytest.raises(ValueError, match=r'ViT-B-32'):
        load_openclip('ViT-B-23')
    with pytest.raises(FileNotFoundError, match=r'neither a file nor an OpenCLIP tag'):
        load_openclip('ViT-B-32', 'no_such_tag_or_file')


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript_archive(state_dict, path):
    """A TorchScript archive whose state dict is `state_dict`, as OpenAI's released CLIP files are (their
    code is a traced CLIP; only the state dict is ever read)."""
    root = _Holder()
    for key, value in state_dict.items():
        module, (*parents, leaf) = root, key.split('.')
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_buffer(leaf, value)
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope='module')
def openai_b32(tmp_path_factory):
    """OpenAI-format ViT-B-32 weights made here: a perturbed random QuickGELU CLIP, its linear and conv
    weights in fp16 as in OpenAI's release, plus the release's three extra entries; saved as a TorchScript
    archive (what pretrained='openai' downloads) and as a plain state dict."""
    torch.manual_seed(1)
    ref = open_clip.create_model('ViT-B-32-quickgelu')
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    open_clip.model.convert_weights_to_fp16(ref)
    state_dict = dict(ref.state_dict(), input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                      vocab_size=torch.tensor(49408))
    d = tmp_path_factory.mktemp('openai')
    save_torchscript_archive(state_dict, d / 'ViT-B-32.pt')
    torch.save(state_dict, d / 'state_dict.pt')
    return d


@pytest.mark.parametrize('fmt', ['ViT-B-32.pt', 'state_dict.pt'])
def test_openai_weights_reproduce_openclip(openai_b32, fmt):
    path = str(openai_b32 / fmt)
    ref = open_clip.load_openai_model(path, device='cpu').eval()  # OpenCLIP's own loader of these files
    model = load_openclip('ViT-B-32', path, boundary='none').eval()
    assert model.visual.cfg.quick_gelu  # as OpenAI trained them, though 'ViT-B-32' says GELU
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    texts = open_clip.get_tokenizer('ViT-B-32')(['a dog', 'a small red circle'])
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-5
        assert (model.encode_text(texts) - ref.encode_text(texts)).abs().max() <= 1e-5
        assert ref.encode_image(images).abs().max() > 1


@pytest.mark.parametrize('content', [b'', b'PK\x03\x04 truncated', bytes(range(256)) * 4, b'not a checkpoint\n'])
def test_unreadable_checkpoint_names_the_file(tmp_path, content, openclip_b32):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{bad} is not a readable checkpoint"):
        load_openclip('ViT-B-32', str(bad))
    truncated = tmp_path / 'truncated.pt'  # a real checkpoint cut short, as by a full disk
    truncated.write_bytes((openclip_b32[0] / 'raw.pt').read_bytes()[:100000])
    with pytest.raises(ValueError, match=rf"{truncated} is not a readable checkpoint"):
        load_openclip('ViT-B-32', str(truncated))


def test_own_training_checkpoint_loads_as_pretrained(tmp_path):
    """A train_clip.py ckpt.pt given as pretrained: its weights load into a model with its settings
    (here 1 + 1 blocks of an OpenCLIP ViT-B-32, not the config's 12); other settings are told what to do."""
    args = dict(model_name='ViT-B-32', pretrained=None, text=dict(width=32, heads=2, layers=1, context_length=16),
                image_size=32, patch_size=8, width=32, heads=2, embed_dim=16, pre_layers=1, short_layers=1)
    torch.manual_seed(0)
    trained = load_openclip(**args)
    path = tmp_path / 'ckpt.pt'
    torch.save(dict(model=trained.state_dict(), optimizer={}, step=3, config={}, model_args=args), path)
    loaded = load_openclip(**{**args, 'pretrained': str(path)})
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    plain = load_openclip(**{**args, 'pretrained': str(path), 'boundary': 'none'})  # drops the predictor
    assert torch.equal(plain.visual.proj, trained.visual.proj)
    with pytest.raises(KeyError, match=r"shapes.*visual\.conv1\.weight.*init_from='resume'") as e:
        load_openclip(**{**args, 'pretrained': str(path), 'width': 64})
    assert len(str(e.value)) < 2000  # a few names, not every key of the model
    with pytest.raises(ValueError, match=r'depth of the checkpoint .*ckpt\.pt \(2 blocks\)'):
        load_openclip(**{**args, 'pretrained': str(path), 'short_layers': 3})


def test_pretrained_tag_offline_asks_for_a_local_file(monkeypatch):
    def offline(cfg, **kw):
        raise FileNotFoundError('Name or service not known')
    monkeypatch.setattr(open_clip, 'download_pretrained', offline)
    with pytest.raises(RuntimeError, match=r'pass the local file.*load_openclip'):
        load_openclip('ViT-B-32', 'laion2b_s34b_b79k')


def test_openclip_configs_map_to_the_right_architecture():
    b16 = load_openclip('ViT-B-16')
    assert (b16.visual.cfg.heads, b16.visual.cfg.patch_size, b16.visual.cfg.n_patches) == (12, 16, 196)
    s32 = load_openclip('ViT-S-32', compression=10)
    assert (s32.visual.cfg.width, s32.visual.cfg.heads, s32.visual.cfg.embed_dim) == (384, 6, 384)
    quick = load_openclip('ViT-B-32-quickgelu')
    assert quick.visual.cfg.quick_gelu
    assert isinstance(quick.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert isinstance(quick.text.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


# 2. the task loss reaches the predictor ---------------------------------------------------------

def test_task_loss_alone_reaches_every_predictor_parameter():
    torch.manual_seed(0)
    vit = DTPViT(tiny(compression=4)).train()
    features, aux = vit(torch.randn(4, 3, 32, 32))
    features.square().sum().backward()  # no boundary loss in this loss
    for name, p in vit.predictor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# 3. batch invariance --------------------------------------------------------------------------

@pytest.mark.parametrize('pool', ['cls', 'mean'])
@pytest.mark.parametrize('eval_boundaries', ['threshold', 'topk'])
def test_features_do_not_depend_on_the_rest_of_the_batch(pool, eval_boundaries):
    torch.manual_seed(0)
    cfg = DTPConfig(pool=pool, eval_boundaries=eval_boundaries, compression=4)  # ViT-B-32 shapes
    vit = DTPViT(cfg).eval()
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()  # thresholds near 0.5: segment counts differ from image to image
        images = torch.randn(5, 3, 224, 224)
        batch, aux = vit(images)
        alone = torch.cat([vit(images[i:i + 1])[0] for i in range(5)])
    if eval_boundaries == 'threshold':  # the property under test needs padding in the batch
        assert len(set(aux['n_segments'].tolist())) > 1, aux['n_segments']
    assert (batch - alone).abs().max() <= 1e-5


# 4. deterministic evaluation --------------------------------------------------------------------

@pytest.mark.parametrize('eval_boundaries', ['threshold', 'topk'])
def test_eval_is_deterministic_and_train_is_sampled(eval_boundaries):
    torch.manual_seed(0)
    vit = DTPViT(tiny(eval_boundaries=eval_boundaries))
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()
    images = torch.randn(4, 3, 32, 32)
    vit.eval()
    (f1, a1), (f2, a2) = vit(images), vit(images)
    assert torch.equal(f1, f2) and torch.equal(a1['boundaries'], a2['boundaries'])
    vit.train()
    assert not torch.equal(vit(images)[1]['boundaries'], vit(images)[1]['boundaries'])


@pytest.mark.parametrize('compression', [2.0, 4.0, 10.0])
def test_default_eval_compression_matches_training(compression):
    """A fresh predictor is uncertain: thresholding it at 0.5 keeps almost no boundaries, so the
    default eval rule must be the one that keeps eval-time compression near training's."""
    torch.manual_seed(0)
    vit = DTPViT(DTPConfig(compression=compression))  # ViT-B-32 shapes
    images = torch.randn(32, 3, 224, 224)
    with torch.no_grad():
        train = torch.stack([vit.train()(images)[1]['compression'] for _ in range(3)]).mean()
        default = vit.eval()(images)[1]['compression']
    assert abs(default / train - 1) <= 0.15, (train, default)
    assert abs(train / compression - 1) <= 0.1  # the predictor starts at the target rate


# 5. conservation -------------------------------------------------------------------------------

def test_every_patch_is_pooled_exactly_once():
    torch.manual_seed(0)
    B, N = 6, 49
    raw = (torch.rand(B, N) < 0.2).float()
    raw[0] = 0  # no boundary at all: one segment of everything
    raw[1, -1] = 0  # patches after the last boundary must form a segment, not be dropped
    raw[2] = 1  # one segment per patch
    b = torch.cat([raw[:, :-1], torch.ones(B, 1)], dim=1)  # what the model does
    x = torch.eye(N).expand(B, N, N)  # patch t is the unit vector e_t
    pooled, valid, sizes = M.pool_segments(x, b)
    n_segments = b.sum(1).long()
    counts = (pooled > 0).sum(-1)  # patches in each segment
    for i in range(B):
        S = n_segments[i]
        # segment s holds its patches with weight 1/count each: times the count, a 0/1 membership
        membership = pooled[i, :S] * counts[i, :S, None]
        assert torch.allclose(membership.sum(0), torch.ones(N))  # every patch in exactly one segment
        assert torch.allclose(membership, membership.round())
        assert (counts[i, :S] > 0).all() and (pooled[i, S:] == 0).all()  # padding is empty
        assert valid[i].tolist() == [True] * S + [False] * (len(valid[i]) - S)  # counts differ: padding marked
        assert sizes[i].tolist() == counts[i, :S].tolist() + [0] * (sizes.shape[1] - S)  # patches per segment
    assert n_segments[0] == 1 and n_segments[2] == N
    assert M.pool_segments(x, M.fixed_boundaries(B, N, 7))[1] is None  # equal counts: nothing padded, no mask


def test_the_pooling_gradient_is_the_papers_trick():
    """Written out patch by patch, the DTP paper's pooling: a patch's weight in its own segment is
    1 + (seg_t - seg_t without gradient), 1 in value, d weight / d seg_t = +1, where seg_t is the number of boundaries
    before patch t; a segment is the weighted mean of its patches, its size the sum of their weights. pool_segments
    gives the same values, and the same gradients to x and to the boundaries b, through the means and the sizes."""
    torch.manual_seed(0)
    B, N, D = 3, 12, 5
    x = torch.randn(B, N, D, requires_grad=True)
    b = (torch.rand(B, N) < 0.3).float()
    b[:, -1] = 1
    b.requires_grad_()
    pooled, _, sizes = M.pool_segments(x, b)
    by_hand, hand_sizes = torch.zeros_like(pooled), torch.zeros_like(sizes)
    for i in range(B):
        seg = [b[i, :t].sum() for t in range(N)]  # boundaries strictly before patch t
        for s in range(int(b[i].sum())):
            members = [t for t in range(N) if round(seg[t].item()) == s]
            weights = [1 + seg[t] - seg[t].detach() for t in members]
            by_hand[i, s] = sum(w * x[i, t] for w, t in zip(weights, members)) / sum(weights)
            hand_sizes[i, s] = sum(weights)
    assert torch.allclose(pooled, by_hand, atol=1e-6) and torch.equal(sizes.detach(), hand_sizes.detach())
    g, h = torch.randn_like(pooled), torch.randn_like(sizes)
    ours = torch.autograd.grad((pooled * g).sum() + (sizes * h).sum(), (x, b))
    theirs = torch.autograd.grad((by_hand * g).sum() + (hand_sizes * h).sum(), (x, b))
    assert ours[1].abs().max() > 0.1  # the boundaries get a gradient
    assert all(torch.allclose(a, c, atol=1e-5) for a, c in zip(ours, theirs))


def test_last_patch_always_closes_a_segment():
    torch.manual_seed(0)
    vit = DTPViT(tiny(compression=8))
    images = torch.randn(8, 3, 32, 32)
    for mode in ['train', 'eval']:
        getattr(vit, mode)()
        assert (vit(images)[1]['boundaries'][:, -1] == 1).all()
    _, aux = vit(images, boundaries=torch.zeros(8, 64))  # even when the caller forgets it
    assert aux['n_segments'].tolist() == [1] * 8


def test_threshold_evaluation_cuts_where_p_is_above_one_half_strictly():
    """eval_boundaries='threshold' keeps b = 1 where p > 0.5: logits of exactly 0 (p = 0.5) cut nowhere but at the
    last patch, logits just above cut everywhere."""
    vit = DTPViT(tiny(eval_boundaries='threshold')).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        vit.predictor[-1].weight.zero_()
        for bias, expected in [(0.0, 1), (1e-6, 64), (-1e-6, 1)]:
            vit.predictor[-1].bias.fill_(bias)
            assert vit(images)[1]['n_segments'].tolist() == [expected] * 3, bias


@pytest.mark.parametrize('boundary', ['none', 'fixed', 'gumbel'])
def test_boundaries_stay_float32_in_a_bfloat16_model(boundary):
    """Boundaries are counted (segment ids are their running sum): in bfloat16 a count stops being exact at 256,
    so they stay float32 in a model cast to bfloat16. 324 patches: the last one's segment id must be 323."""
    vit = DTPViT(tiny(boundary=boundary, image_size=72, compression=1)).to(torch.bfloat16).eval()
    with torch.no_grad():
        if boundary == 'gumbel':
            vit.predictor[-1].bias.fill_(10.0)  # every patch a boundary, as the other two rules at compression 1
        _, aux = vit(torch.randn(2, 3, 72, 72, dtype=torch.bfloat16))
    assert aux['boundaries'].dtype == torch.float32
    assert aux['segment_ids'][:, -1].tolist() == [323, 323] and aux['n_segments'].tolist() == [324, 324]


def test_the_plain_vit_refuses_boundaries_to_pool():
    """boundary='none' pools nothing, so given boundaries would be silently ignored: an error names the fix."""
    with pytest.raises(ValueError, match="^boundary='none' pools nothing: build the tower with 'fixed' to pool given"):
        DTPViT(tiny(boundary='none'))(torch.randn(2, 3, 32, 32), boundaries=torch.ones(2, 64))


# 6. boundary prior -----------------------------------------------------------------------------

def test_boundary_loss_is_the_binomial_nll():
    b = (torch.rand(5, 49) < 0.3).float()
    for prior in [0.1, 0.25, 0.5]:
        k = b.sum(1)
        expected = -torch.distributions.Binomial(49, probs=torch.tensor(prior)).log_prob(k) / 49
        assert torch.allclose(M.boundary_prior_loss(b, prior), expected.mean(), atol=1e-6)


@pytest.mark.parametrize('compression', [4.0, 10.0])
def test_boundary_loss_alone_trains_the_rate_to_the_target(compression):
    torch.manual_seed(0)
    vit = DTPViT(tiny(image_size=64, compression=compression)).train()  # 256 patches
    with torch.no_grad():
        vit.predictor[-1].bias.zero_()  # start far from the target: rate 0.5
    opt = torch.optim.Adam(vit.predictor.parameters(), lr=3e-3)
    rates = []
    for step in range(300):
        _, aux = vit(torch.randn(16, 3, 64, 64))
        opt.zero_grad()
        aux['boundary_loss'].backward()
        opt.step()
        rates.append(aux['boundaries'].mean().item())
    achieved, target = sum(rates[-50:]) / 50, 1 / compression
    print(f'compression {compression}: boundary rate {achieved:.4f}, target {target:.4f}')
    assert abs(achieved - target) <= 0.1 * target


# 7. fixed pooling and mixed precision ----------------------------------------------------------

@pytest.mark.parametrize('n', [49, 196, 64])
@pytest.mark.parametrize('compression', [1, 2, 3, 4, 10, 49, 98])
def test_fixed_pooling_cuts_n_over_r_rounded_half_up_even_segments(n, compression):
    """The count is N / r rounded half up, at least 1 (49 / 2 = 24.5 -> 25, not Python's round() to even),
    and the evenly spaced segments differ in size by one patch at most."""
    S = max(1, int(n / compression + 0.5))
    cfg = DTPConfig(image_size=int(math.isqrt(n)) * 8, patch_size=8, compression=compression)
    assert cfg.n_patches == n and cfg.n_segments == S
    b = M.fixed_boundaries(2, n, cfg.n_segments)
    assert (b.sum(1) == S).all() and b[0, -1] == 1
    ends = torch.nonzero(b[0]).flatten()
    sizes = torch.diff(ends, prepend=torch.tensor([-1]))
    assert sizes.max() - sizes.min() <= 1


def test_fixed_boundaries_are_made_on_the_device_asked_for():
    """Built where the model runs (a GPU's boundaries on the CPU would fail in pooling): the meta device shows it
    without a GPU."""
    assert M.fixed_boundaries(2, 36, 9, device='meta').device.type == 'meta'
    assert M.fixed_boundaries(2, 36, 9).device.type == 'cpu'
    b, count, _ = DTPViT(tiny(boundary='fixed')).segment(torch.zeros(2, 64, 32, device='meta'))  # and by the tower
    assert (b.device.type, tuple(b.shape), count) == ('meta', (2, 64), 16)
    b, count, _ = DTPViT(tiny(boundary='fixed')).segment(torch.zeros(2, 64, 32, device='meta'), torch.ones(2, 64))
    assert (b.device.type, count) == ('meta', None)  # given boundaries (flops.py's, on the CPU) are moved there


def test_given_boundaries_of_any_dtype_pool_as_float_ones():
    """Boundaries given as integers or booleans pool exactly as the same 0/1 floats do."""
    torch.manual_seed(0)
    vit = DTPViT(tiny(boundary='fixed')).eval()
    images, b = torch.randn(2, 3, 32, 32), torch.rand(2, 64) < 0.3
    with torch.no_grad():
        expected, aux = vit(images, boundaries=b.float())
        for given in [b, b.long()]:
            features, aux = vit(images, boundaries=given)
            assert aux['boundaries'].dtype == torch.float32 and torch.equal(features, expected), given.dtype


def test_pooling_builds_everything_on_the_device_of_its_input_and_checks_the_count_given():
    """pool_segments on the meta device (a tensor built on the CPU instead would meet meta tensors and fail, as a
    GPU's would), with the count given (no host sync); and a count that is not the boundaries' is an error that
    says so (on a GPU it surfaces at the next sync)."""
    b = M.fixed_boundaries(2, 36, 9, device='meta')
    pooled, real, sizes = M.pool_segments(torch.zeros(2, 36, 8, device='meta'), b, 9)
    assert (pooled.device.type, sizes.device.type, tuple(pooled.shape), real) == ('meta', 'meta', (2, 9, 8), None)
    with pytest.raises(RuntimeError, match='^pool_segments: a segment count is not the one given$'):
        M.pool_segments(torch.zeros(2, 36, 8), M.fixed_boundaries(2, 36, 9), 8)


def test_gumbel_sigmoid_draws_bernoulli_with_logistic_noise_and_the_straight_through_gradient():
    """hard = 1 exactly where logits + logit(u) > 0 for the u that torch.rand_like draws, and the gradient is
    that of sigmoid((logits + logit(u)) / temperature): sigma' / temperature."""
    logits = torch.linspace(-3, 3, 200).reshape(4, 50).requires_grad_()
    for temperature in (0.5, 2.0):
        torch.manual_seed(0)
        u = torch.rand_like(logits)
        torch.manual_seed(0)
        b = M.gumbel_sigmoid(logits, temperature)
        z = logits.detach() + torch.log(u) - torch.log1p(-u)
        assert torch.equal(b.detach(), (z > 0).float())
        grad, = torch.autograd.grad(b.sum(), logits)
        s = torch.sigmoid(z / temperature)
        assert torch.allclose(grad, s * (1 - s) / temperature, atol=1e-6)


def test_fixed_mode_in_the_model():
    vit = DTPViT(DTPConfig(boundary='fixed', compression=4)).eval()  # ViT-B-32: 49 patches
    with torch.no_grad():
        _, aux = vit(torch.randn(2, 3, 224, 224))
    assert aux['n_segments'].tolist() == [12, 12] and aux['boundary_loss'] == 0  # round(49 / 4)
    assert not hasattr(vit, 'predictor')


@pytest.mark.parametrize('compression', [2.0, 4.0, 3.0, 10.0])
def test_one_segment_count_for_fixed_pooling_topk_eval_and_flops(compression):
    """At ratio r every path keeps N / r segments rounded half up (49 / 2 = 24.5 -> 25): the FLOP
    tables count what evaluation runs."""
    import flops
    images = torch.randn(2, 3, 224, 224)
    expected = math.floor(49 / compression + 0.5)
    counts = []
    for boundary, mode in [('fixed', 'eval'), ('fixed', 'train'), ('gumbel', 'eval')]:
        vit = DTPViT(DTPConfig(boundary=boundary, compression=compression, short_layers=1))
        with torch.no_grad():
            counts += getattr(vit, mode)()(images)[1]['n_segments'].tolist()
    assert counts == [expected] * 6
    cfg = DTPConfig(compression=compression)
    assert sum(flops.closed_form(cfg).values()) == sum(flops.closed_form(cfg, expected).values())


def test_topk_eval_gives_round_n_over_r_segments():
    vit = DTPViT(tiny(compression=3.0)).eval()
    with torch.no_grad():
        _, aux = vit(torch.randn(4, 3, 32, 32))
    assert aux['n_segments'].tolist() == [round(64 / 3)] * 4
    assert abs(aux['compression'] - 64 / 21) < 1e-5


@pytest.mark.parametrize('boundary', ['gumbel', 'fixed'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_mixed_precision_forward_backward_is_finite(dtype, boundary):
    torch.manual_seed(0)
    vit = DTPViT(tiny(compression=4, boundary=boundary)).train()
    if boundary == 'gumbel':
        with torch.no_grad():  # a confident predictor: probabilities near 0 and 1, where fp16 broke
            vit.predictor[-1].weight.mul_(50)
    with torch.autocast('cpu', dtype=dtype):
        features, aux = vit(torch.randn(4, 3, 32, 32))
        loss = features.float().square().mean() + aux['boundary_loss']
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in vit.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_its_predictor_in_float32(dtype):
    """A gumbel model cast with .half() / .to(torch.bfloat16) runs (train and eval, forward and backward), and
    its predictor still computes in float32: the logits are those of a float32 copy of it, bit for bit."""
    torch.manual_seed(0)
    vit = DTPViT(tiny()).to(dtype)
    inputs = []
    vit.predictor.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    images = torch.randn(4, 3, 32, 32).to(dtype)
    for train in (False, True):
        features, aux = vit.train(train)(images)
        assert features.dtype == dtype and torch.isfinite(features).all()
        assert inputs[-1].dtype == torch.float32
        with torch.no_grad():
            expected = copy.deepcopy(vit.predictor).float()(inputs[-1]).squeeze(-1)
        assert aux['boundary_logits'].dtype == torch.float32 and torch.equal(aux['boundary_logits'], expected)
    (features.float().square().mean() + aux['boundary_loss']).backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name


# CLIP wrapper ---------------------------------------------------------------------------------

def test_clip_forward_returns_what_a_training_step_needs():
    torch.manual_seed(0)
    model = CLIP(tiny(), TEXT_TINY).train()
    texts = open_clip.tokenize(['a red circle', 'a blue square'], context_length=16)
    out = model(torch.randn(2, 3, 32, 32), texts)
    assert set(out) >= {'image_features', 'text_features', 'logit_scale', 'boundary_loss', 'compression',
                        'n_segments', 'boundaries'}
    assert torch.allclose(out['image_features'].norm(dim=-1), torch.ones(2))
    assert torch.allclose(out['logit_scale'], torch.tensor(1 / 0.07))
    assert torch.allclose(model.encode_text(texts, normalize=True), out['text_features'])


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match='boundary'):
        DTPConfig(boundary='dynamic')
    with pytest.raises(ValueError, match='compression'):
        DTPConfig(compression=0.5)
    with pytest.raises(ValueError, match="eval_boundaries='threshold' needs a learned predictor"):
        DTPConfig(boundary='fixed', eval_boundaries='threshold')  # a setting that does not apply is refused
    with pytest.raises(ValueError, match='boundary'):
        DTPConfig(boundary='router')  # routers.py's rules are RouterConfig's


# 8. errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize('temperature', [0.0, -0.5])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match=r'DTPConfig\.temperature=.*must be > 0'):
        DTPConfig(temperature=temperature)


@pytest.mark.parametrize('size', [35, 28, 64])
def test_images_of_the_wrong_size_are_refused(size):
    """35 px into a 32 px model of 8 px patches used to be cropped silently to 32 px; 28 px gave 9 patches."""
    vit = DTPViT(tiny(patch_size=8)).eval()
    with pytest.raises(ValueError, match=rf'takes \(B, 3, 32, 32\) images, got \(2, 3, {size}, {size}\)'):
        vit(torch.randn(2, 3, size, size))
    with pytest.raises(ValueError, match=r'takes \(B, 3, 32, 32\) images'):
        vit(torch.randn(3, 32, 32))  # a single image without its batch dimension


def check_exact_counts_need_no_host_sync(m, monkeypatch):
    """Where every image gets exactly n_segments (top-k, evenly spaced), pooling does not read the count
    back from the device (on a GPU such a read stalls the host) and computes what the reading path computes."""
    images = torch.randn(3, 3, 32, 32)
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, 'tolist', lambda t: reads.append(t) or real_tolist(t))
    torch.manual_seed(1)
    features, aux = m(images)
    assert reads == []
    assert (aux['n_segments'] == m.cfg.n_segments).all()
    torch.manual_seed(1)  # the same boundaries given from outside take the reading path: the same features
    given, _ = m(images, boundaries=aux['boundaries'])
    assert len(reads) == 1
    torch.testing.assert_close(given, features, rtol=0, atol=0)
    # a count that is not the batch's is caught, not turned into wrong pooling
    with pytest.raises(RuntimeError, match='segment count'):
        M.pool_segments(torch.randn(3, 64, 8), aux['boundaries'], count=m.cfg.n_segments + 1)


@pytest.mark.parametrize('boundary, training', [('gumbel', False), ('fixed', True), ('fixed', False)])
def test_exact_segment_counts_need_no_host_sync(boundary, training, monkeypatch):
    torch.manual_seed(0)
    check_exact_counts_need_no_host_sync(DTPViT(tiny(boundary=boundary, compression=5.0)).train(training), monkeypatch)
