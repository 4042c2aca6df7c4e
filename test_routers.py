"""Tests of routers.py: the weightless colour and cosine rules, size-aware attention, and the learned router
(REINFORCE with a self-critical baseline, segments of at least min_segment patches, extent embeddings)."""
import pytest
import torch
import torch.nn.functional as F

import model as M
import routers as R
from model import DTPConfig, DTPViT, load_openclip
from routers import RouterConfig, RouterViT
from test_model import check_exact_counts_need_no_host_sync, openclip_b32  # noqa: F401 (a fixture)


def tiny(**kw):
    """A small router tower: 64 patches of 4x4 pixels, width 32 (test_model.tiny's geometry)."""
    return RouterConfig(**{**dict(image_size=32, patch_size=4, width=32, heads=2, pre_layers=1, short_layers=2,
                                  embed_dim=16, predictor_hidden=32), **kw})


def base(**kw):
    return DTPConfig(**{**dict(image_size=32, patch_size=4, width=32, heads=2, pre_layers=1, short_layers=2,
                               embed_dim=16, predictor_hidden=32), **kw})


def with_content(vit):
    """REINFORCE's last layer starts at zero: give the router's logits content of their own, and the extent
    embeddings values, so that neither can hide behind its initialisation."""
    with torch.no_grad():
        vit.predictor[-1].weight.normal_()
        vit.extent_embedding['start'].normal_()
    return vit


def reinforce(aux, sample_losses, greedy_losses=None, distortion_weight=0.0):
    greedy_losses = torch.zeros_like(sample_losses) if greedy_losses is None else greedy_losses
    return R.reinforce_loss(aux, sample_losses, greedy_losses, distortion_weight)


# 1. OpenCLIP weights, batch invariance, determinism ----------------------------------------------

@pytest.mark.parametrize('boundary', ['router', 'color', 'cosine'])
def test_a_router_tower_with_every_patch_a_segment_reproduces_openclip(openclip_b32, boundary):  # noqa: F811
    """The router's new weights (predictor, extent embeddings zero at first) and size-aware attention (log 1 = 0)
    change nothing where every patch is its own segment: OpenCLIP's image features to 1e-5."""
    d, images, _, (ref_image, _) = openclip_b32
    model = load_openclip('ViT-B-32', str(d / 'raw.pt'), tower=RouterViT, boundary=boundary,
                          size_attention=True).eval()
    with torch.no_grad():
        forced, aux = model.visual(images, boundaries=torch.ones(3, 49))
    assert aux['n_segments'].tolist() == [49] * 3
    assert (forced - ref_image).abs().max() <= 1e-5


def test_the_demo_routers_evaluation_is_deterministic_and_batch_invariant():
    """config/shapes_router4x.py's router at ViT-B-32 shapes (min_segment=2, colour prior, pair-reading
    predictor, extent embeddings): the cuts evaluation takes, one after another, depend on each image alone."""
    torch.manual_seed(0)
    vit = with_content(RouterViT(RouterConfig(compression=4))).eval()
    with torch.no_grad():
        images = torch.randn(5, 3, 224, 224)
        batch, aux = vit(images)
        again = vit(images)[0]
        alone = torch.cat([vit(images[i:i + 1])[0] for i in range(5)])
    assert torch.equal(batch, again) and (batch - alone).abs().max() <= 1e-5
    assert aux['segment_sizes'].min() >= 2 and aux['n_segments'].eq(12).all()  # 49 patches at 4x


@pytest.mark.parametrize('boundary, training', [('router', True), ('router', False), ('color', False),
                                                ('cosine', True)])
def test_exact_segment_counts_need_no_host_sync(boundary, training, monkeypatch):
    torch.manual_seed(0)
    check_exact_counts_need_no_host_sync(RouterViT(tiny(boundary=boundary, compression=5.0)).train(training),
                                         monkeypatch)


# 2. the weightless rules -----------------------------------------------------------------------

def test_cosine_rule_cuts_where_the_tokens_change_without_training():
    """boundary='cosine' has no weights: at initialisation it already closes segments where a token
    sequence changes (4 runs of 16 equal tokens, plus noise: boundaries after patches 15, 31, 47, 63),
    in any image of the batch, deterministically, in training as in evaluation."""
    torch.manual_seed(0)
    vit = RouterViT(tiny(boundary='cosine', compression=16))  # 64 patches -> 4 segments
    assert not any('predictor' in k or 'extent' in k for k in vit.state_dict())
    runs = torch.randn(2, 4, 1, 32).expand(2, 4, 16, 32).reshape(2, 64, 32)
    patches = runs + 0.05 * torch.randn(2, 64, 32)
    for mode in (vit.train(), vit.eval()):
        b = mode.best_cuts(mode.scores(patches, None))
        assert [row.nonzero().flatten().tolist() for row in b] == [[15, 31, 47, 63]] * 2
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f, aux = vit(images)
        assert aux['n_segments'].tolist() == [4] * 4 and 'boundary_logits' not in aux
        assert torch.allclose(f, torch.cat([vit(images[i:i + 1])[0] for i in range(4)]), atol=1e-5)


def test_color_rule_cuts_where_the_colour_changes_without_training():
    """boundary='color' has no weights and reads the pixels: four bands of two patch rows in four
    colours (plus noise) are cut at the band edges, after patches 15, 31, 47 and 63 of the raster scan,
    in training as in evaluation, whatever the tower's weights; features stay batch-invariant."""
    torch.manual_seed(0)
    vit = RouterViT(tiny(boundary='color', compression=16))  # 64 patches of 4x4 px -> 4 segments
    assert not any('predictor' in k or 'extent' in k for k in vit.state_dict())
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [0.2, 0.2, 0.2]])
    bands = colours.repeat_interleave(8, dim=0)  # (32 pixel rows, 3)
    images = bands.T[None, :, :, None].expand(3, 3, 32, 32) + 0.1 * torch.randn(3, 3, 32, 32)
    for train in (True, False):
        _, aux = vit.train(train)(images)
        assert [row.nonzero().flatten().tolist() for row in aux['boundaries']] == [[15, 31, 47, 63]] * 3
        assert aux['segment_ids'].view(3, 8, 8)[:, :, 0].tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]] * 3
    _, other = RouterViT(tiny(boundary='color', compression=16)).eval()(images)  # other weights, same cuts
    assert torch.equal(other['boundaries'], aux['boundaries'])
    mixed = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f, _ = vit.eval()(mixed)
        assert torch.allclose(f, torch.cat([vit(mixed[i:i + 1])[0] for i in range(4)]), atol=1e-5)


# 3. size-aware attention -----------------------------------------------------------------------

def test_size_bias_weighs_a_key_as_that_many_copies():
    """Attention with + log(s) on a key's logit equals attention over s copies of that key."""
    torch.manual_seed(0)
    attn = M.Attention(8, 2)
    a, b = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    bias = torch.log(torch.tensor([1.0, 3.0]))[None, None, None, :]
    with torch.no_grad():
        weighted = attn(torch.cat([a, b], dim=1), R.Biased(None, bias))
        copies = attn(torch.cat([a, b, b, b], dim=1))
    assert torch.allclose(weighted, copies[:, :2], atol=1e-6)


def test_size_attention_uses_the_segment_sizes_and_keeps_batch_invariance():
    """size_attention: the bias is log(patches per segment) ([CLS] 0, padding -inf); an image's features do
    not depend on its batch-mates, also where the batch is padded; with one segment per patch (all sizes 1) it
    is the tower without it, and otherwise it changes the features."""
    torch.manual_seed(0)
    vit = RouterViT(tiny(boundary='cosine', size_attention=True)).eval()
    plain = RouterViT(tiny(boundary='cosine')).eval()
    plain.load_state_dict(vit.state_dict())
    images = torch.randn(5, 3, 32, 32)
    given = (torch.rand(5, 64) < torch.tensor([0.1, 0.3, 0.5, 0.2, 0.05])[:, None]).float()  # counts differ
    with torch.no_grad():
        batch, aux = vit(images, given)
        alone = torch.cat([vit(images[i:i + 1], given[i:i + 1])[0] for i in range(5)])
        assert len(set(aux['n_segments'].tolist())) > 1
        assert (batch - alone).abs().max() <= 1e-5
        sizes = aux['segment_sizes']
        counts = torch.stack([torch.bincount(ids, minlength=sizes.shape[1]) for ids in aux['segment_ids']])
        assert torch.equal(sizes, counts.float())  # patches per segment, 0 at the padding
        every_patch = torch.ones(5, 64)
        assert torch.allclose(vit(images, every_patch)[0], plain(images, every_patch)[0], atol=1e-5)
        assert not torch.allclose(vit(images)[0], plain(images)[0], atol=1e-3)


@pytest.mark.parametrize('boundary, size_attention', [('router', False), ('router', True), ('cosine', True),
                                                      ('color', False)])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_mixed_precision_forward_backward_is_finite(dtype, boundary, size_attention):
    torch.manual_seed(0)
    vit = RouterViT(tiny(compression=4, boundary=boundary, size_attention=size_attention)).train()
    if boundary == 'router':
        with_content(vit)
    with torch.autocast('cpu', dtype=dtype):
        features, aux = vit(torch.randn(4, 3, 32, 32))
        task = features.float().square().sum(1)
    loss = task.mean() + aux['boundary_loss']
    if boundary == 'router':
        loss = loss + reinforce(aux, task, aux['greedy_features'].float().square().sum(1), 3.0)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in vit.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert boundary != 'router' or vit.predictor[-1].weight.grad.any()


# 4. the learned router's cuts --------------------------------------------------------------------

@pytest.mark.parametrize('n, k, m', [(36, 9, 2), (49, 12, 2), (36, 4, 4), (64, 16, 2), (16, 4, 2)])
def test_spaced_cuts_keep_every_segment_that_long(n, k, m):
    """k boundaries, every segment at least m patches, in the draws and in the cuts evaluation takes;
    those are the largest logits allowed, one after another, and with m = 1 exactly top-k."""
    torch.manual_seed(0)
    logits = torch.randn(200, n)
    for noise in (None, 1.0, 2.0):
        b, _ = R.spaced_cuts(logits, k, m, noise)
        sizes = torch.stack([torch.bincount(ids, minlength=k) for ids in M.segment_ids(b).long()])
        assert b.sum(1).eq(k).all() and b[:, -1].eq(1).all() and sizes.min() >= m
    assert torch.equal(R.spaced_cuts(logits, k, 1)[0], M.topk_boundaries(logits, k))
    best = R.spaced_cuts(logits, k, m)[0]
    first = logits[:, m - 1:n - m].argmax(1) + m - 1  # the first cut: the largest logit a cut may take
    assert best[torch.arange(200), first].eq(1).all()


@pytest.mark.parametrize('m', [1, 2])
def test_spaced_cut_draws_are_plackett_luce_and_their_log_probability_is_exact(m):
    """One cut drawn in 8 patches (the last patch closes the other segment) with segments of at least m: it is
    drawn among the allowed patches with probability softmax(logits / noise) over them, and its log-probability
    is that log-softmax. With 3 segments both cuts keep m patches apart, and the log-probability's gradient
    reaches only the logits the draws chose among."""
    torch.manual_seed(0)
    logits = torch.tensor([0.5, 1.0, -0.5, 0.3, 2.0, 0.0, 0.7, -1.0])
    lo, hi = m - 1, 8 - m - 1  # the patches a cut may take: m from both ends
    for noise in (1.0, 2.0):
        hard, log_prob = R.spaced_cuts(logits.expand(40000, 8), 2, m, noise)
        drawn = hard[:, :-1].argmax(1)
        expected = torch.log_softmax(logits[lo:hi + 1] / noise, 0)
        assert drawn.ge(lo).all() and drawn.le(hi).all()
        assert torch.allclose(log_prob, expected[drawn - lo], atol=1e-6)
        frequency = torch.bincount(drawn - lo, minlength=hi - lo + 1) / len(drawn)
        assert torch.allclose(frequency, expected.exp(), atol=0.01)
    hard, _ = R.spaced_cuts(logits.expand(1000, 8), 3, m, 2.0)
    cuts = hard[:, :-1].nonzero()[:, 1].view(-1, 2)
    assert (cuts[:, 1] - cuts[:, 0]).ge(m).all()
    leaf = logits.clone().requires_grad_(True)
    R.spaced_cuts(leaf.expand(64, 8), 3, m, noise=2.0)[1].sum().backward()
    chosen = torch.zeros(8, dtype=torch.bool)
    chosen[lo:hi + 1] = True
    assert torch.isfinite(leaf.grad).all() and leaf.grad[chosen].ne(0).all() and leaf.grad[~chosen].eq(0).all()


def test_reinforce_learns_to_draw_the_rewarded_boundary():
    """REINFORCE on bare logits, 3 patches drawn of 15 (ordered draws): a loss of 0 for the draws that
    cut after patch 5 and 1 for the others makes that cut nearly certain (1 in 5 at first)."""
    torch.manual_seed(0)
    logits = torch.zeros(16, requires_grad=True)
    optimizer = torch.optim.SGD([logits], lr=0.5)
    for _ in range(200):
        hard, log_prob = R.spaced_cuts(logits.expand(64, 16), 4, 1, noise=1.0)
        optimizer.zero_grad()
        reinforce(dict(boundary_log_prob=log_prob), 1 - hard[:, 5]).backward()
        optimizer.step()
    hard, _ = R.spaced_cuts(logits.detach().expand(2000, 16), 4, 1, noise=1.0)
    assert hard[:, 5].mean() > 0.95 and hard.sum(1).eq(4).all()


def test_the_router_starts_as_the_colour_rule_and_learns():
    """color_prior: the router's last layer starts at zero, so it starts with the 'color' rule's cuts (with
    min_segment=1: the same top-k), and REINFORCE reaches the gain that weighs the colour changes, a weight
    of the predictor's (the router's learning rate, not the backbone's)."""
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    color = RouterViT(tiny(boundary='color', compression=4)).eval()
    vit = RouterViT(tiny(compression=4, min_segment=1)).eval()
    with torch.no_grad():
        assert torch.equal(vit(images)[1]['segment_ids'], color(images)[1]['segment_ids'])
        fixed = DTPViT(base(boundary='fixed', compression=4))
        assert not torch.equal(vit(images)[1]['segment_ids'], fixed(images)[1]['segment_ids'])
    features, aux = vit.train()(images)
    reinforce(aux, features.square().sum(1)).backward()
    assert vit.predictor.color_gain.grad.abs() > 0
    assert 'predictor.color_gain' in dict(vit.named_parameters())


def test_the_router_trains_its_predictor_alone_by_reinforce():
    """The task loss sends the router's predictor nothing (hard samples, detached input); REINFORCE on it
    does, to the predictor alone; the backbone's gradient is the task's."""
    torch.manual_seed(0)
    vit = with_content(RouterViT(tiny(compression=4)))
    images = torch.randn(4, 3, 32, 32)
    features, aux = vit.train()(images)
    assert aux['n_segments'].tolist() == [16] * 4 and aux['boundary_log_prob'].shape == (4,)
    task = features.square().sum(1)  # each image's own task loss
    task.sum().backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in vit.predictor.parameters())
    backbone = {n: p.grad.clone() for n, p in vit.named_parameters() if 'predictor' not in n}
    assert backbone['conv1.weight'].any() and backbone['extent_embedding.start'].any()
    reinforce(aux, task).backward()
    assert vit.predictor.color_gain.grad.any() and vit.predictor[-1].weight.grad.any()
    assert all(torch.equal(p.grad, backbone[n]) for n, p in vit.named_parameters() if 'predictor' not in n)


def test_the_greedy_baseline_pass_computes_what_evaluation_computes():
    """Training returns, besides the sampled features (with their gradient), the features of the same images
    with the router's best cuts, which are exactly the eval-mode features and carry no gradient."""
    torch.manual_seed(0)
    vit = with_content(RouterViT(tiny(compression=4)))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, eval_aux = vit.eval()(images)
    fixed = DTPViT(base(boundary='fixed', compression=4))
    assert not torch.equal(eval_aux['segment_ids'], fixed(images)[1]['segment_ids'])
    features, aux = vit.train()(images)
    assert torch.allclose(aux['greedy_features'], expected, atol=1e-6) and not aux['greedy_features'].requires_grad
    assert features.requires_grad and not torch.allclose(features, expected, atol=1e-3)  # the sample moved cuts
    assert 'greedy_features' not in vit.eval()(images)[1]


def test_a_sample_equal_to_the_best_cuts_teaches_nothing():
    """Noise too small to move any cut: every sample is the best cut, its loss the baseline's, so the cost
    (sampled minus greedy loss) is 0 and REINFORCE sends the predictor no gradient."""
    torch.manual_seed(0)
    vit = with_content(RouterViT(tiny(compression=4, noise=1e-4))).train()
    features, aux = vit(torch.randn(4, 3, 32, 32))
    task, greedy = features.square().sum(1), aux['greedy_features'].square().sum(1)
    assert torch.allclose(task, greedy) and torch.allclose(aux['pooling_distortion'], aux['greedy_distortion'])
    reinforce(aux, task, greedy, distortion_weight=3.0).backward()
    assert not any(p.grad is not None and p.grad.any() for p in vit.predictor.parameters())


def test_pooling_distortion_is_the_share_of_variance_the_segment_means_lose():
    torch.manual_seed(0)
    x, b = torch.randn(3, 12, 5), (torch.rand(3, 12) < 0.3).float()
    b[:, -1] = 1
    got = R.pooling_distortion(x, b, M.pool_segments(x, b)[0])
    for i in range(3):  # by hand: each patch against its segment's mean, over each patch against the image's
        lost, start = 0.0, 0
        for end in b[i].nonzero().flatten().tolist():
            lost, start = lost + (x[i, start:end + 1] - x[i, start:end + 1].mean(0)).square().sum(), end + 1
        assert torch.allclose(got[i], lost / (x[i] - x[i].mean(0)).square().sum(), atol=1e-6)
    one = F.pad(torch.zeros(3, 11), (0, 1), value=1.0)  # a single segment: its mean is the image's
    assert torch.allclose(R.pooling_distortion(x, one, M.pool_segments(x, one)[0]), torch.ones(3))
    assert R.pooling_distortion(x, torch.ones(3, 12), x).abs().max() < 1e-6  # a patch per segment: nothing lost


def test_the_pooling_distortion_is_reported_in_training_only():
    torch.manual_seed(0)
    vit = with_content(RouterViT(tiny(compression=4)))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, aux = vit.train()(images)
        assert aux['pooling_distortion'].shape == (4,) and aux['pooling_distortion'].gt(0).all()
        assert 'pooling_distortion' not in vit.eval()(images)[1]


@pytest.mark.parametrize('color_prior', [0.1, 0.0])
def test_reinforce_with_the_distortion_cost_learns_where_the_patches_change(color_prior):
    """REINFORCE on the pooling distortion alone (distortion_weight's term, against the best cuts): in
    images of three runs of one colour each, a router whose logits start unrelated to the runs ends cutting
    where the runs end, with far less lost by the segments' means. It learns to weigh the colour change between patches (its gain starting too
    small to matter) or, without a colour prior, to see the change in the features of neighbouring patches."""
    torch.manual_seed(0)
    vit = RouterViT(tiny(compression=5, image_size=16, patch_size=4, color_prior=color_prior, min_segment=1))
    with torch.no_grad():  # logits that have nothing to do with the runs outweigh the small colour prior at first
        vit.predictor[-1].weight.normal_()

    def images(n):  # cuts after two random patches of each image, which close its first two runs
        changes = torch.rand(n, 15).argsort(1)[:, :2]
        run = (torch.arange(16) > changes[:, :1]).long() + (torch.arange(16) > changes[:, 1:]).long()  # (n, 16)
        colours = torch.randn(n, 3, 3).gather(2, run[:, None].expand(-1, 3, -1)).view(n, 3, 4, 4)
        x = colours.repeat_interleave(4, 2).repeat_interleave(4, 3) + 0.05 * torch.randn(n, 3, 16, 16)
        return x, F.one_hot(changes, 16).sum(1)  # the images and their (n, 16) true cuts

    def greedy(x):
        with torch.no_grad():
            _, aux = vit.train()(x)
            return aux['greedy_distortion'].mean().item()

    x, truth = images(256)
    start = greedy(x)
    optimizer = torch.optim.Adam(vit.predictor.parameters(), lr=0.05)
    for _ in range(100):
        _, aux = vit.train()(images(32)[0])
        optimizer.zero_grad()
        zero = torch.zeros(32)
        reinforce(aux, zero, zero, distortion_weight=1.0).backward()
        optimizer.step()
    cuts = vit.eval()(x)[1]['boundaries'][:, :-1]
    assert (cuts * truth[:, :-1]).sum() > 0.75 * cuts.sum()  # where a colour ends (2 in 15 by chance)
    assert greedy(x) < 0.65 * start and (color_prior == 0 or vit.predictor.color_gain > 1)


def test_the_router_reads_each_patch_and_the_next():
    """The logit of patch t reads patch t + 1 too (the change between them); the last patch, which has no
    next one, reads only itself."""
    torch.manual_seed(0)
    vit = with_content(RouterViT(tiny(color_prior=0.0))).eval()
    patches = torch.randn(1, 64, 32)
    with torch.no_grad():  # the router reads its input detached: perturb each patch in turn instead
        logits = vit.scores(patches, None)[0]
        reads = torch.stack([vit.scores(patches + F.one_hot(torch.tensor(j), 64)[None, :, None], None)[0] != logits
                             for j in range(64)], dim=1)  # (64 logits, 64 patches): does logit t depend on patch j
    assert torch.equal(reads, torch.eye(64, dtype=torch.bool) | torch.ones(63).diag(1).bool())


def test_extent_embedding_marks_each_segments_first_and_last_patch():
    """Each pooled token of the router gets start[first patch] + end[last patch] added: zero at
    initialisation (the same features as model.py's pooling of the same cuts), then learned from the task
    loss alone, at the rows of the patches that start and end segments and nowhere else."""
    torch.manual_seed(0)
    vit = RouterViT(tiny(compression=16))
    plain = DTPViT(base(boundary='fixed', compression=16))  # segments 0-15, ..., 48-63
    plain.load_state_dict({k: v for k, v in vit.state_dict().items() if not M.is_new(k)})
    images, fixed = torch.randn(2, 3, 32, 32), M.fixed_boundaries(2, 64, 4)
    assert torch.equal(vit.eval()(images, fixed)[0], plain.eval()(images, fixed)[0])
    vit.train()(images, fixed)[0].square().sum().backward()
    for name, rows in (('start', [0, 16, 32, 48]), ('end', [15, 31, 47, 63])):
        grad = vit.extent_embedding[name].grad
        assert grad.abs().sum(dim=1).nonzero().flatten().tolist() == rows, name
    with torch.no_grad():  # embeddings that spell out their own row: the token names its extent
        vit.extent_embedding['start'][:, 0] = torch.arange(64.0)
        vit.extent_embedding['end'][:, 1] = 100 + torch.arange(64.0)
    b = torch.zeros(2, 64)
    b[0, [2, 9, 63]] = 1      # segments 0-2, 3-9, 10-63
    b[1, [0, 40, 62, 63]] = 1  # segments 0-0, 1-40, 41-62, 63-63
    extent = vit.extent(b, 4)[..., :2]
    assert extent[0].tolist() == [[0, 102], [3, 109], [10, 163], [0, 0]]  # the padding segment stays zero
    assert extent[1].tolist() == [[0, 100], [1, 140], [41, 162], [63, 163]]


def test_min_segment_in_the_tower_holds_in_evaluation_and_in_the_samples():
    """With min_segment the cuts evaluation takes are spaced_cuts' most probable ones (not top-k's), and
    the sampled ones keep every segment that long too."""
    torch.manual_seed(0)
    vit = with_content(RouterViT(tiny(compression=4, min_segment=2)))
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        _, eval_aux = vit.eval()(images)
        _, train_aux = vit.train()(images)
    logits = eval_aux['boundary_logits']
    assert torch.equal(eval_aux['boundaries'], R.spaced_cuts(logits, 16, 2)[0])
    assert not torch.equal(eval_aux['boundaries'], M.topk_boundaries(logits, 16))
    for aux in (eval_aux, train_aux):
        assert aux['segment_sizes'].min() >= 2 and aux['n_segments'].eq(16).all()
    assert torch.isfinite(train_aux['boundary_log_prob']).all()


def threshold_cuts_by_hand(row, threshold, m):
    """threshold_cuts of one image, by hand: the places above threshold, best first, each taken if it leaves m
    patches to both ends and no cut taken so far lies within m - 1 of it; the last patch always closes."""
    n, cuts = len(row), []
    for t in sorted(range(n - 1), key=lambda t: -row[t]):
        if row[t] > threshold and m - 1 <= t <= n - 1 - m and all(abs(t - c) >= m for c in cuts):
            cuts.append(t)
    return sorted(cuts) + [n - 1]


@pytest.mark.parametrize('m', [1, 2, 3])
def test_threshold_cuts_take_every_place_above_the_threshold_best_first_and_spaced(m):
    torch.manual_seed(0)
    logits = torch.randn(30, 25)
    for threshold in (-1.0, 0.0, 0.8, 1.6, 10.0):
        b = R.threshold_cuts(logits, threshold, m)
        assert [row.nonzero().flatten().tolist() for row in b] == [
            threshold_cuts_by_hand(row, threshold, m) for row in logits.tolist()]
    counts = R.threshold_cuts(logits, 0.8, m).sum(1)
    assert counts.min() < counts.max()  # a count per image


def test_a_calibrated_threshold_gives_the_target_mean_count_and_each_image_its_own():
    """eval_boundaries='threshold' for the router: refused until calibrated; calibrate sets the threshold at which the
    images' mean count is the target (16 segments of 64 patches at 4x), each image keeps its own count (with
    segments of at least min_segment), and an image's features do not depend on the batch it is padded in."""
    torch.manual_seed(0)
    vit = with_content(RouterViT(tiny(compression=4, min_segment=2, eval_boundaries='threshold'))).eval()
    images = torch.randn(40, 3, 32, 32)
    with pytest.raises(RuntimeError, match='calibrate'):
        vit(images[:2])
    threshold, mean = vit.calibrate(images.split(16))
    assert threshold == vit.cut_threshold and mean == pytest.approx(16, abs=1 / 40)
    with torch.no_grad():
        features, aux = vit(images)
        alone = torch.cat([vit(images[i:i + 1])[0] for i in range(40)])
    assert aux['n_segments'].float().mean().item() == pytest.approx(mean)
    sizes = aux['segment_sizes']
    assert aux['n_segments'].min() < aux['n_segments'].max() and sizes[sizes > 0].min() >= 2  # 0: padding
    assert torch.equal(aux['boundaries'], R.threshold_cuts(aux['boundary_logits'], threshold, 2))
    assert (features - alone).abs().max() <= 1e-5
    assert vit.train()(images)[1]['n_segments'].eq(16).all()  # training still samples exactly k


# 5. settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('settings, message', [
    (dict(min_segment=0), 'must be >= 1'),
    (dict(min_segment=3, compression=3), 'cannot all be sure to get 3'),  # 16 segments of 3 in 49 patches
    (dict(boundary='color', eval_boundaries='threshold'), 'needs a learned predictor'),
    (dict(noise=0.0), r'noise=0.0: must be > 0'),
    (dict(lr_scale=0.0), r'lr_scale=0.0: must be > 0'),
    (dict(color_prior=-1.0), 'must be >= 0'),
    (dict(distortion_weight=-1.0), 'must be >= 0'),
    (dict(boundary='gumbel'), 'boundary'),  # model.py's rules are DTPConfig's
])
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**settings)


def test_the_segment_length_bound_applies_to_the_learned_router_only():
    RouterConfig(min_segment=2, compression=4)  # ViT-B-32 at 4x: 12 segments of 49
    RouterConfig(boundary='cosine', compression=2)  # 25 segments of 49: only the learned router keeps a minimum
    with pytest.raises(ValueError, match='cannot all be sure to get 2'):
        RouterConfig(compression=2)


# What each rule reads (edge_cues, python routers.py) -------------------------------------------------

def test_edge_auc_is_the_chance_that_an_edge_outscores_a_non_edge():
    torch.manual_seed(0)
    scores, edges = torch.randint(0, 5, (300,)).float(), torch.rand(300) < 0.3  # many ties
    pos, neg = scores[edges], scores[~edges]
    by_hand = sum((p > n) + 0.5 * (p == n) for p in pos.tolist() for n in neg.tolist()) / (len(pos) * len(neg))
    assert R.edge_auc(scores, edges) == pytest.approx(by_hand, abs=1e-12)
    assert R.edge_auc(edges.float(), edges) == 1.0 and R.edge_auc(-edges.float(), edges) == 0.0
    assert R.edge_auc(torch.zeros(300), edges) == 0.5


def demo_view(style, n):
    """n val images of a shapes style as the demo's tower sees them (48 px, 8 px patches), with their object patches."""
    import io
    import open_clip
    from PIL import Image
    import data
    transform = open_clip.image_transform(48, is_train=False)
    mean, std = open_clip.OPENAI_DATASET_MEAN[0], open_clip.OPENAI_DATASET_STD[0]
    images, objects = [], []
    for i in range(n):
        jpg, _, _, mask = data._render(7 * i, 0, 1, 64, style)
        images.append(transform(Image.open(io.BytesIO(jpg)).convert('RGB')))
        share = transform(Image.fromarray(mask).convert('RGB'))[0] * std + mean  # as data.shapes_object_patches
        objects.append(F.avg_pool2d(share[None, None], 8).flatten() >= 1 / 3)
    return torch.stack(images), torch.stack(objects)


def test_the_colour_cue_marks_object_edges_in_the_colour_style_only():
    """The default data hands a pooling rule its objects' edges through the colour change alone; 'clutter' takes
    that away (its mosaic changes colour everywhere), and 'count' keeps it. Evenly spaced cuts read nothing."""
    cfg = RouterConfig(image_size=48, patch_size=8, width=128, heads=4, embed_dim=128, pre_layers=2, short_layers=4)
    cues = {style: R.edge_cues(*demo_view(style, 120), cfg) for style in ('colour', 'clutter', 'count')}
    for style in cues:
        assert cues[style]['fixed'][1] == pytest.approx(8 / 35, abs=0.08)  # 8 cuts of 35 pairs, wherever edges are
    assert cues['colour']['color'][0] > 0.9 and cues['colour']['color'][1] > 0.8
    assert cues['count']['color'][0] > 0.8
    assert cues['clutter']['color'][0] < 0.75 and cues['clutter']['color'][1] < 0.5
    assert cues['clutter']['cosine'][0] < cues['colour']['cosine'][0]


def test_routers_cli_prints_each_cue_on_a_style(monkeypatch, capsys):
    monkeypatch.setattr('sys.argv', ['routers.py', '--style', 'colour', '--images', '60'])
    R.main()
    out = capsys.readouterr().out
    assert "shapes_style='colour': 60 val images, 36 patches" in out and '4x (9 segments)' in out
    rows = {line.split(' | ')[0][2:]: line.split(' | ')[1:] for line in out.splitlines() if line.startswith('| ')}
    assert float(rows['colour change of the pixels'][0]) > 0.9 and rows['evenly spaced (no cue)'][0] == '-'
