"""Tests of tome.py (Token Merging on the plain ViT), on tiny towers (64 patches of 4x4 pixels) and a small
OpenCLIP checkpoint."""
import copy

import open_clip
import pytest
import torch

import tome
from model import DTPConfig, DTPViT, load_openclip


def tiny_vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = DTPConfig(**{**dict(image_size=32, patch_size=4, width=32, heads=2, pre_layers=0, short_layers=3,
                              embed_dim=16, boundary='none'), **kw})
    return DTPViT(cfg).eval()


def images(n, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('pool', ['cls', 'mean'])
@pytest.mark.parametrize('r', [0, [0, 0, 0]])
def test_r0_is_the_plain_vit(pool, r):
    vit = tiny_vit(pool=pool)
    x = images(3)
    with torch.no_grad():
        plain, _ = vit(x)
        merged, aux = tome.tome_forward(vit, x, r)
    assert (merged - plain).abs().max() <= 1e-5
    assert aux['n_segments'].tolist() == [64] * 3 and aux['token_sizes'].eq(1).all()
    assert aux['segment_ids'].tolist() == [list(range(64))] * 3


def test_sizes_are_conserved_and_segment_ids_agree_with_them():
    """Every patch is in exactly one token: the sizes sum to N + 1 after any number of merges, [CLS]
    stays a token of size 1, and the patches the segment ids assign to each token are its size."""
    vit = tiny_vit()
    with torch.no_grad():
        for r in (1, 5, 13, 40):
            _, aux = tome.tome_forward(vit, images(2), r)
            sizes, ids = aux['token_sizes'], aux['segment_ids']
            assert sizes.sum(1).tolist() == [65.0, 65.0] and sizes[:, 0].tolist() == [1.0, 1.0]
            S = aux['n_segments'][0].item()
            assert sizes.shape == (2, 1 + S) and ids.min() >= 0 and ids.max() < S
            for b in range(2):
                assert torch.bincount(ids[b], minlength=S).float().tolist() == sizes[b, 1:].tolist()
            assert aux['boundaries'].sum(1).tolist() == [S, S]
            assert aux['compression'].item() == pytest.approx(64 / S)


def test_a_merge_conserves_the_size_weighted_sum():
    """merge() sums x * size and size; the merged token is their quotient, so sum(x * size) over
    the tokens is the same before and after."""
    torch.manual_seed(0)
    x, size = torch.randn(2, 9, 5, dtype=torch.float64), torch.randint(1, 6, (2, 9, 1)).double()
    kept, src, dst = tome.bipartite_soft_matching(torch.randn(2, 9, 4, dtype=torch.float64), 3)
    merged = tome.merge(torch.cat([x * size, size], -1), kept, src, dst)
    assert merged.shape == (2, 6, 6)
    assert torch.allclose(merged.sum(1), torch.cat([x * size, size], -1).sum(1))
    # and in a block: with its MLP's output zeroed, the tokens after attention (r = 0) and after
    # attention and 3 merges hold the same size-weighted sum and the same total size
    block = tiny_vit().transformer.resblocks[0].double()
    with torch.no_grad():
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
        x = torch.randn(2, 9, 32, dtype=torch.float64)
        size = size.float()
        before, _, _ = tome.block_forward(block, x, size, 0)
        after, after_size, pos = tome.block_forward(block, x, size, 3)
    assert after.shape == (2, 6, 32) and after_size.sum(1).tolist() == size.sum(1).tolist()
    assert torch.allclose((after * after_size).sum(1), (before * size).sum(1))
    assert torch.allclose(after[:, 0], before[:, 0])  # [CLS] is not merged


def test_known_merge_on_a_hand_made_input():
    """Tokens 0..5: A = 0 ([CLS]), 2, 4; B = 1, 3, 5. Token 4's key is token 3's, so they are the
    most similar pair and merge first; [CLS]'s key is token 1's, yet [CLS] is never merged."""
    e = torch.eye(4, dtype=torch.float64)
    keys = torch.stack([e[0], e[0], e[1] + 0.5 * e[3], e[2], 3 * e[2], e[3]])[None]  # scale is no matter: cosine
    kept, src, dst = tome.bipartite_soft_matching(keys, 1)
    assert (kept.tolist(), src.tolist(), dst.tolist()) == ([[0, 1]], [[2]], [[1]])  # A index 2 = token 4 -> token 3
    # the merge: size-weighted average, the sizes adding up, [CLS] first and untouched
    x = torch.arange(6, dtype=torch.float64).view(1, 6, 1)
    size = torch.tensor([1., 1., 1., 2., 3., 1.], dtype=torch.float64).view(1, 6, 1)
    merged = tome.merge(torch.cat([x * size, size], -1), kept, src, dst)
    values, sizes = (merged[..., 0] / merged[..., 1]).tolist()[0], merged[..., 1].tolist()[0]
    assert sizes == [1, 1, 1, 5, 1]                    # [CLS], token 2, then B: tokens 1, 3 + 4, 5
    assert values == pytest.approx([0, 2, 1, (3 * 2 + 4 * 3) / 5, 5])
    # with r = 2, token 2 goes too (it leans towards token 5); [CLS] still stays
    kept, src, dst = tome.bipartite_soft_matching(keys, 2)
    assert (kept.tolist(), sorted(src[0].tolist()), dst[0, src[0].argsort()].tolist()) == ([[0]], [1, 2], [2, 1])
    # new_positions: where every old token went (token 4 into token 3's place)
    kept, src, dst = tome.bipartite_soft_matching(keys, 1)
    assert tome.new_positions(6, kept, src, dst).tolist() == [[0, 2, 1, 3, 3, 4]]


def test_matching_is_by_cosine_similarity_whatever_the_keys_norms():
    """Each A token goes to the B token of highest cosine similarity, and the r best pairs merge: against a
    brute-force reference, on keys whose norms differ by 100x (a dot product would pick other pairs)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 17, 8, generator=g) * torch.logspace(-1, 1, 17)[torch.randperm(17, generator=g)][:, None]
    kept, src, dst = tome.bipartite_soft_matching(keys, 4)
    for i in range(3):
        a, b = keys[i, ::2], keys[i, 1::2]
        cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)
        cos[0] = -2  # [CLS]
        best, best_b = cos.max(1)
        order = best.argsort(descending=True)
        assert src[i].tolist() == order[:4].tolist() and dst[i].tolist() == best_b[order[:4]].tolist()
        assert kept[i].tolist() == sorted(order[4:].tolist())


def test_cls_is_never_merged_even_at_the_largest_r():
    vit = tiny_vit()
    with torch.no_grad():
        _, aux = tome.tome_forward(vit, images(2), 1000)  # saturates: (L - 1) // 2 per block
    assert aux['token_sizes'][:, 0].tolist() == [1.0, 1.0]
    assert aux['n_segments'].tolist() == [tome.token_counts(65, [1000] * 3)[-1] - 1] * 2 == [8, 8]  # 65 -> 33 -> 17 -> 9


def test_proportional_attention_treats_a_token_of_size_two_as_two_copies():
    """A sequence with token 3 written twice (sizes 1) and the same sequence with it once at size 2
    give every other token the same attention output: what log(size) on the logits is for."""
    block = tiny_vit().transformer.resblocks[0]
    torch.manual_seed(0)
    x = torch.randn(1, 6, 32)
    twice = torch.cat([x, x[:, 3:4]], dim=1)
    size = torch.ones(1, 6, 1)
    size[0, 3] = 2
    with torch.no_grad():
        out_twice, _, _ = tome.block_forward(block, twice, None, 0)
        out_once, _, _ = tome.block_forward(block, x, size, 0)
        plain, _, _ = tome.block_forward(block, x, None, 0)
    assert torch.allclose(out_once, out_twice[:, :6], atol=1e-5)
    assert not torch.allclose(plain, out_twice[:, :6], atol=1e-3)  # without the sizes it differs


def test_output_does_not_depend_on_the_rest_of_the_batch():
    vit = tiny_vit(pool='mean').double()
    x = images(4).double()
    with torch.no_grad():
        batch, aux = tome.tome_forward(vit, x, [6, 10, 4])
        for i in range(4):
            alone, aux_i = tome.tome_forward(vit, x[i:i + 1], [6, 10, 4])
            assert torch.allclose(alone[0], batch[i], atol=1e-10)
            assert torch.equal(aux_i['segment_ids'][0], aux['segment_ids'][i])


def test_gradients_reach_every_parameter_of_the_tower():
    vit = tiny_vit().train()
    features, _ = tome.tome_forward(vit, images(2), 8)
    features.square().sum().backward()
    for name, p in vit.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_schedule_gives_the_token_counts_per_block():
    vit = tiny_vit()
    seen = []  # (tokens into attention, tokens into the MLP) of every block
    hooks = [m.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[1]))
             for block in vit.transformer.resblocks for m in (block.ln_1, block.ln_2)]
    with torch.no_grad():
        _, aux = tome.tome_forward(vit, images(2), [2, 0, 5])
    for h in hooks:
        h.remove()
    assert seen == [65, 63, 63, 63, 63, 58]
    assert tome.token_counts(65, [2, 0, 5]) == [65, 63, 63, 58] and aux['n_segments'].tolist() == [57, 57]
    with pytest.raises(ValueError, match='one per block'):
        tome.tome_forward(vit, images(1), [2, 2])
    with pytest.raises(ValueError, match='>= 0'):
        tome.schedule(-1, 3)


def test_patch_keeps_the_module_and_its_weights():
    vit = tiny_vit()
    x = images(2)
    with torch.no_grad():
        plain = vit(x)[0]
        keys = list(vit.state_dict())
        tome.patch(vit, 8)
        patched, aux = vit(x)
        assert aux['n_segments'].tolist() == [tome.token_counts(65, [8] * 3)[-1] - 1] * 2
        assert torch.equal(patched, tome.tome_forward(vit, x, 8)[0]) and list(vit.state_dict()) == keys
        twin = copy.deepcopy(vit)  # the copy's forward runs the copy's weights
        twin.proj.data.zero_()
        assert twin(x)[0].abs().max() == 0 and vit(x)[0].abs().max() > 0
        assert torch.equal(tome.unpatch(vit)(x)[0], plain) and not hasattr(vit, 'tome_r')
        assert torch.equal(tome.unpatch(vit)(x)[0], plain)  # unpatching a plain tower changes nothing
    with pytest.raises(ValueError, match="boundary='none'"):
        tome.patch(tiny_vit(boundary='fixed', pre_layers=1, short_layers=1), 4)


def test_runs_on_an_openclip_checkpoint(tmp_path):
    """An OpenCLIP checkpoint loaded with boundary='none': r = 0 is OpenCLIP's encode_image, r > 0 merges.
    (A random ViT-S-32 at 64 px: 4 patches + [CLS], every weight perturbed, so that a LayerNorm left at its
    initial weight 1 and bias 0 cannot hide a missing or swapped mapping.)"""
    torch.manual_seed(0)
    ref = open_clip.create_model('ViT-S-32', force_image_size=64).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save(ref.state_dict(), tmp_path / 'openclip.pt')
    vit = load_openclip('ViT-S-32', str(tmp_path / 'openclip.pt'), image_size=64, boundary='none').visual.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref.encode_image(x)
        assert (tome.tome_forward(vit, x, 0)[0] - expected).abs().max() <= 1e-5
        merged, aux = tome.tome_forward(vit, x, 1)
    assert aux['n_segments'].tolist() == [1, 1] and not torch.allclose(merged, expected, atol=1e-3)


@pytest.mark.parametrize('tome_r, tome_cost, boundary, message', [
    (2, 0.0, 'gumbel', r"^config error: tome_r / tome_cost: ToMe merges the plain ViT's tokens; set boundary='none' "
                       r"\(got boundary='gumbel'\)$"),
    (0, 0.5, 'fixed', r"set boundary='none' \(got boundary='fixed'\)$"),
    (0, 0.5, 'router', r"set boundary='none' \(got boundary='router'\)$"),
    (2, 0.5, 'none', r"^config error: tome_r=2 and tome_cost=0.5: set one of them, not both$"),
    (-1, 0.0, 'none', r"^config error: tome_r=-1, tome_cost=0.0: expected tome_r >= 0"),
    (0, 1.5, 'none', r"^config error: tome_r=0, tome_cost=1.5: expected .*0 < tome_cost <= 1"),
    (0, -0.5, 'none', r"tome_cost=-0.5: expected"),
])
def test_check_settings_names_the_one_problem(tome_r, tome_cost, boundary, message):
    """The training scripts' ToMe settings: one line per problem (one message for all of them used to tell a
    plain run that it "needs boundary='none' (got 'none')")."""
    with pytest.raises(SystemExit, match=message) as e:
        tome.check_settings(tome_r, tome_cost, boundary)
    assert '\n' not in str(e.value) and "(got 'none')" not in str(e.value)


@pytest.mark.parametrize('tome_r, tome_cost', [(2, 0.0), (0, 0.5), (0, 1.0), ([1, 2, 3], 0.0)])
def test_check_settings_accepts_what_applies(tome_r, tome_cost):
    tome.check_settings(tome_r, tome_cost, 'none')


def test_applied_is_what_each_block_really_merges():
    """r saturates at (L - 1) // 2 per block: 1 + 16 tokens, r = 1000 on 2 blocks merges 8 (17 -> 9), then 4
    (9 -> 5); 1 + 64 tokens on 3 blocks: 32, 16, 8. A schedule within the limits is applied as it is."""
    assert tome.applied(17, 1000, 2) == [8, 4]
    assert tome.applied(65, 1000, 3) == [32, 16, 8]
    assert tome.applied(65, [2, 0, 5], 3) == [2, 0, 5]
    assert tome.applied(17, [0, 9], 2) == [0, 8]
    vit = tiny_vit()  # and it is what the patched forward leaves: 64 - 32 - 16 - 8 = 8 patch tokens
    with torch.no_grad():
        assert tome.tome_forward(vit, images(1), 1000)[1]['n_segments'].item() == 64 - sum(tome.applied(65, 1000, 3))
    with pytest.raises(ValueError, match='one per block'):
        tome.applied(17, [1, 2, 3], 2)
