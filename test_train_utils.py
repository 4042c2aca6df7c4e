"""Tests of train_utils.py: the configurator and the shared training plumbing."""
import errno
import os

import pytest
import torch

from train_utils import configure, cosine_lr, param_groups, save_checkpoint, trim_log

DEFAULTS = dict(out_dir='out', batch_size=64, lr=5e-4, compile=False, compression=4.0, init_from='scratch',
                imagenet_val=None, betas=(0.9, 0.98))


def test_files_then_overrides_in_order(tmp_path):
    first, second = tmp_path / 'a.py', tmp_path / 'b.py'
    first.write_text("batch_size = 32\n_helper = 3\nlr = 1e-3 * _helper\n")
    second.write_text("batch_size = 16\n")
    config = configure(DEFAULTS, [str(first), str(second), '--out_dir=out/run-1', '--compile=True',
                                  '--compression=10', "--imagenet_val='/data/imagenet/val'", '--betas=(0.9, 0.95)'])
    assert config == dict(DEFAULTS, batch_size=16, lr=3e-3, out_dir='out/run-1', compile=True, compression=10.0,
                          imagenet_val='/data/imagenet/val', betas=(0.9, 0.95))
    assert type(config['compression']) is float  # an int given for a float default becomes a float


def test_unknown_key_names_it_and_close_matches(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown key 'batchsize'; did you mean 'batch_size'"):
        configure(DEFAULTS, ['--batchsize=8'])
    bad = tmp_path / 'bad.py'
    bad.write_text("compresion = 10.0\n")
    with pytest.raises(SystemExit, match=r"bad\.py.*'compresion'.*'compression'"):
        configure(DEFAULTS, [str(bad)])


def test_wrong_type_and_malformed_arguments_fail_clearly():
    with pytest.raises(SystemExit, match=r"batch_size='big' is a str, expected a int"):
        configure(DEFAULTS, ['--batch_size=big'])
    with pytest.raises(SystemExit, match=r"compile=1 is a int, expected a bool"):
        configure(DEFAULTS, ['--compile=1'])
    with pytest.raises(SystemExit, match=r'--key=value'):
        configure(DEFAULTS, ['--lr'])
    with pytest.raises(SystemExit, match=r'no config file'):
        configure(DEFAULTS, ['config/does_not_exist.py'])


def test_cosine_schedule():
    lrs = [cosine_lr(s, 100, 10, 1.0) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5) and lrs[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale():
    from model import CLIP, DTPConfig
    model = CLIP(DTPConfig(image_size=32, patch_size=8, width=32, heads=2, pre_layers=1, short_layers=1,
                           embed_dim=16), dict(context_length=8, width=32, heads=2, layers=1))
    decay, no_decay = param_groups(model.named_parameters(), 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    decay_names = {names[id(p)] for p in decay['params']}
    assert {'logit_scale', 'visual.class_embedding', 'visual.positional_embedding', 'visual.ln_pre.weight',
            'text.token_embedding.weight', 'visual.transformer.resblocks.0.attn.in_proj_bias'} <= no_decay_names
    assert {'visual.proj', 'visual.conv1.weight', 'visual.transformer.resblocks.0.attn.in_proj_weight',
            'visual.predictor.1.weight', 'text.text_projection'} <= decay_names
    assert len(decay_names) + len(no_decay_names) == len(names)


def test_checkpoint_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    save_checkpoint({'step': 1}, path)

    def crash(obj, f):  # dies half-way through writing the next checkpoint
        open(f, 'wb').write(b'partial')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'step': 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'step': 1}  # the previous checkpoint is intact


def test_disk_full_is_a_clear_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    save_checkpoint({'step': 1}, str(path))

    def disk_full(obj, f):
        open(f, 'wb').write(b'x' * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(SystemExit, match=rf'{path}: No space left on device \(\d+ MiB free there\)'):
        save_checkpoint({'step': 2}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['ckpt.pt'] and torch.load(path, weights_only=True) == {'step': 1}


def test_two_runs_saving_at_once_do_not_collide(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    save = torch.save

    def save_while_another_run_saves(obj, f):
        save(obj, f)
        if obj['step'] == 1:  # the other run writes its checkpoint in the middle of this one's
            save_checkpoint({'step': 2}, path)
    monkeypatch.setattr(torch, 'save', save_while_another_run_saves)
    save_checkpoint({'step': 1}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'step': 1} and os.listdir(tmp_path) == ['ckpt.pt']


def test_resume_drops_the_log_lines_after_the_checkpoint(tmp_path):
    log = tmp_path / 'log.jsonl'
    log.write_text('{"params_M": 1}\n{"step": 5}\n{"step": 10}\n{"step": 15}\n{"epoch_end": 0, "step": 15}\n{"st')
    trim_log(str(log), 10)
    assert log.read_text() == '{"params_M": 1}\n{"step": 5}\n{"step": 10}\n'
