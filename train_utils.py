"""
The plumbing train_clip.py and train_cls.py share: the nanoGPT-style configurator, torchrun/DDP
setup and teardown, building or resuming the model, atomic checkpoints, the learning-rate schedule,
AdamW parameter groups, the optimizer step, logging and evaluation. Each script keeps its settings
and its training loop, and calls these for the mechanics that would otherwise be copied between them.
"""
import ast
import atexit
import contextlib
import dataclasses
import difflib
import fcntl
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections import defaultdict

import open_clip
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model as dtp_vit
import routers
import tome


# ----------------------------------------------------------------------------------------------
# Configuration, as nanoGPT's configurator: a script's globals are the defaults; positional
# arguments are Python files executed in order; then --key=value pairs, literal-evaluated, in order,
# wherever they stand among the files. A dict setting (vision, text) is merged key by key into the
# current one; None clears it. A key that is not a default, or a value of another type, stops the run
# before anything starts.

def config_keys(namespace):
    """The configurable globals of a script: plain values whose names do not start with '_'."""
    return [k for k, v in namespace.items()
            if not k.startswith('_') and isinstance(v, (bool, int, float, str, tuple, list, dict, type(None)))]


# Settings that were renamed: the old name is refused with the new one (and checkpoints' configs are read with it).
RENAMED = {'model': 'arch'}  # `model` names a module in the scripts; the OpenCLIP architecture is `arch`


# Settings whose None means something (documented beside them); a dict's None clears it.
NULLABLE = {'short_layers'}  # None: the architecture's depth minus pre_layers


def _check(config, key, value, source):
    if key not in config:
        if RENAMED.get(key) in config:
            raise SystemExit(f"config error ({source}): {key!r} is now called {RENAMED[key]!r}; "
                             f"set {RENAMED[key]}={value!r} instead")
        close = difflib.get_close_matches(key, list(config), n=3)
        raise SystemExit(f"config error ({source}): unknown key {key!r}"
                         + (f"; did you mean {' or '.join(map(repr, close))}?" if close else ''))
    default = config[key]
    if value is None and default is not None and not isinstance(default, dict) and key not in NULLABLE:
        raise SystemExit(f"config error ({source}): {key}=None: expected a {type(default).__name__} like the "
                         f"default {default!r}")
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:  # lr=1 is a float to anyone
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    raise SystemExit(f"config error ({source}): {key}={value!r} is a {type(value).__name__}, "
                     f"expected a {type(default).__name__} like the default {default!r}")


def _set(config, key, value, source):
    value = _check(config, key, value, source)
    if isinstance(value, dict):
        # Merged, so that --vision="{'image_size': 64}" changes the image size and nothing else. Replacing
        # the dict silently dropped the other overrides, and {} no longer means "none": refuse it.
        if not value:
            raise SystemExit(f"config error ({source}): {key}={{}} changes nothing ({key} is merged key by key "
                             f"into the current value); {key}=None clears it")
        value = {**(config[key] or {}), **value}
    config[key] = value


def configure(config, argv=None):
    """Return config (a dict of defaults) updated by the config files and --key=value overrides in argv."""
    config = dict(config)
    args = sys.argv[1:] if argv is None else argv
    # Files first, then the pairs: a pair placed before a file would otherwise be overridden by it.
    for arg in [a for a in args if not a.startswith('--')] + [a for a in args if a.startswith('--')]:
        if not arg.startswith('--'):
            if not os.path.isfile(arg):
                raise SystemExit(f"config error: no config file {arg!r}")
            namespace = dict(config)
            try:
                exec(compile(open(arg).read(), arg, 'exec'), namespace)
            except Exception:  # the traceback points into the file; this line says which file it is
                print(f"config error: config file {arg} raised an exception (traceback below)", file=sys.stderr)
                raise
            for key in config_keys(namespace):
                if key not in config or namespace[key] is not config[key]:
                    _set(config, key, namespace[key], arg)
        else:
            key, eq, value = arg[2:].partition('=')
            if not eq:
                raise SystemExit(f"config error: expected --key=value, got {arg!r}")
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # a bare word: keep it as a string, e.g. --out_dir=out/run1
            _set(config, key, value, arg)
    return config


# The settings of DTPConfig that both training scripts take as globals of their own; routers.py's settings
# travel as one dict, `router`.
DTP_GLOBALS = ('pre_layers', 'short_layers', 'boundary', 'compression', 'temperature', 'eval_boundaries', 'pool')
# The settings that make up the architecture (load_openclip's arguments): a resumed run takes them from its checkpoint.
ARCH_SETTINGS = ('arch', 'vision', 'text', 'router', *DTP_GLOBALS)


def tower_class(boundary):
    """The image tower of a boundary rule: model.py's DTPViT, or routers.py's RouterViT for its rules."""
    return routers.RouterViT if boundary in routers.RULES else dtp_vit.DTPViT


def check_settings(config):
    """Refuse, before anything starts, settings that would fail deep inside a run, do not apply, or would
    silently misbehave. Shared by train_clip.py and train_cls.py (keys one script lacks are skipped)."""
    def refuse(message):
        raise SystemExit(f'config error: {message}')

    boundaries = dtp_vit.DTPConfig.BOUNDARIES + routers.RULES
    if 'boundary' in config and config['boundary'] not in boundaries:
        refuse(f"boundary={config['boundary']!r}: expected one of {boundaries} (the last three are routers.py's)")
    tower = tower_class(config.get('boundary'))
    for key in ('vision', 'text', 'router'):
        if config.get(key) is not None and not isinstance(config[key], dict):
            refuse(f'{key}={config[key]!r}: expected a dict of overrides or None')
    router = config.get('router') or {}
    if router and tower is dtp_vit.DTPViT:
        refuse(f"router={router!r} applies to routers.py's rules; set boundary to one of {routers.RULES} "
               f"(got boundary={config.get('boundary')!r}), or router=None")
    if config.get('boundary') in ('color', 'cosine') and set(router) & set(routers.LEARNED_ONLY):
        refuse(f"router[{sorted(set(router) & set(routers.LEARNED_ONLY))[0]!r}] applies to boundary='router' only "
               f"(boundary={config['boundary']!r} has no weights)")
    vision_fields = {f.name for f in dataclasses.fields(dtp_vit.DTPConfig)}
    router_fields = {f.name for f in dataclasses.fields(routers.RouterConfig)} - vision_fields
    text_fields = {f.name for f in dataclasses.fields(open_clip.CLIPTextCfg)}
    defaults = {key: {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
                for key, cls in (('vision', dtp_vit.DTPConfig), ('router', routers.RouterConfig),
                                 ('text', open_clip.CLIPTextCfg))}
    for key, names, what in (('vision', vision_fields, 'DTPConfig field'), ('router', router_fields,
                             'routers.RouterConfig setting'), ('text', text_fields, 'OpenCLIP text_cfg key')):
        for name in config.get(key) or {}:
            if name in DTP_GLOBALS:  # one entry point per setting
                refuse(f"{key}[{name!r}]: {name} is a setting of its own; set it as --{name}=... "
                       f"(or {name} = ... in a config file), not inside {key}")
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3)
                refuse(f"{key}[{name!r}]: no such {what}" + (f"; did you mean {' or '.join(map(repr, close))}?"
                                                            if close else f'; expected one of {sorted(names)}'))
            value, default = config[key][name], defaults[key].get(name)
            if default is not None and value is not None and not (
                    type(value) is type(default) or (type(default) is float and type(value) is int)):
                refuse(f"{key}[{name!r}]={value!r} is a {type(value).__name__}, expected a {type(default).__name__} "
                       f"like the default {default!r}")
    # The pooling settings, checked by the tower's config itself, on the geometry the run will have.
    arch = (open_clip.get_model_config(config['arch']) or {}).get('vision_cfg', {}) if config.get('arch') else {}
    geometry = {k: arch[k] for k in ('image_size', 'patch_size') if isinstance(arch.get(k), int)}
    try:
        tower.config_class(**{**geometry, **(config.get('vision') or {}), **router,
                              **{k: config[k] for k in DTP_GLOBALS if config.get(k) is not None}})
    except ValueError as e:
        # its messages name the config's fields: here the script's settings, or keys of the router dict
        refuse(re.sub(r'RouterConfig\.(\w+)', lambda m: f"router['{m[1]}']" if m[1] in router_fields else m[1],
                      str(e)).replace('DTPConfig.', '').replace('DTPConfig: ', ''))
    if 'shapes_style' in config and config['shapes_style'] not in data.SHAPES_STYLES:
        refuse(f"shapes_style={config['shapes_style']!r}: expected one of {data.SHAPES_STYLES} (data.py)")
    if config.get('precision') not in ('bf16', 'fp16', 'fp32'):
        refuse(f"precision={config.get('precision')!r}: expected 'bf16', 'fp16' or 'fp32'")
    for key, low in (('batch_size', 1), ('log_interval', 1), ('ckpt_interval', 1), ('eval_interval', 0),
                     ('epochs', 0), ('max_steps', 0), ('warmup_steps', 0), ('lr', 0), ('min_lr', 0),
                     ('lr_decay_steps', 0), ('workers', 0), ('weight_decay', 0), ('boundary_loss_weight', 0),
                     ('grad_clip', 0)):  # a negative grad_clip would flip the gradients: the run climbs the loss
        if key in config and not config[key] >= low:
            refuse(f'{key}={config[key]!r}: must be >= {low}' + (' (0: off)' if key == 'grad_clip' else ''))
    if 'label_smoothing' in config and not 0 <= config['label_smoothing'] <= 1:
        refuse(f"label_smoothing={config['label_smoothing']!r}: must be between 0 and 1")
    if config.get('imagenet_val') is not None and not isinstance(config['imagenet_val'], str):
        refuse(f"imagenet_val={config['imagenet_val']!r}: expected the path of an ImageNet val folder (a str)")
    if not config.get('eval_only') and not config.get('epochs') and not config.get('max_steps'):
        refuse('epochs=0 and max_steps=0: nothing to train; set epochs or max_steps (or eval_only=True)')
    if os.path.exists(config['out_dir']) and not os.path.isdir(config['out_dir']):
        refuse(f"out_dir={config['out_dir']!r} is a file, not a directory; choose another out_dir")


# ----------------------------------------------------------------------------------------------
# checkpoints and models, with what a user got wrong stopping the run in one line, not a traceback

def read_checkpoint(path):
    """model.read_checkpoint: what a checkpoint file holds; an unreadable file stops the run naming it."""
    try:
        return dtp_vit.read_checkpoint(path)
    except ValueError as e:
        raise SystemExit(f'checkpoint error: {e}')


def load_model(model_args):
    """model.load_openclip(**model_args); a checkpoint it cannot read or that does not fit the settings
    stops the run with load_openclip's message (which names the file)."""
    try:
        return dtp_vit.load_openclip(**model_args, tower=tower_class(model_args.get('boundary')))
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:  # RuntimeError: a download failed
        raise SystemExit(f"config error: {e.args[0] if e.args else e}")


def new_model_args(config):
    """load_openclip's arguments for a run that does not resume: the OpenCLIP architecture `arch`, resized
    by the `vision` and `text` overrides, with the DTP settings (short_layers None: left to load_openclip,
    the architecture's depth minus pre_layers), and init_from's weights unless it is 'scratch'."""
    dtp = dict(config['vision'] or {}, **(config['router'] or {}), **{k: config[k] for k in DTP_GLOBALS
                                                                       if k != 'short_layers' or config[k] is not None})
    init_from = config['init_from']
    return dict(model_name=config['arch'], pretrained=None if init_from == 'scratch' else init_from,
                text=config['text'], **dtp)


def init_model(config, ckpt_path, resume_keys=(), world_size=None):
    """(model, model_args, ckpt): the OpenCLIP model a run starts from, the arguments that rebuild its
    architecture, and the checkpoint it resumes (None unless init_from='resume'), whose weights the caller
    loads into its own module. A resumed run takes the architecture from the checkpoint, after refusing
    settings in ARCH_SETTINGS or resume_keys that disagree with it (check_resume), and, given world_size
    (training goes on), another number of ranks. model_args, which the run's checkpoints store, has
    pretrained=None: from the first checkpoint on, the weights are in it."""
    ckpt = None
    if config['init_from'] == 'resume':
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"init_from='resume': no checkpoint at {ckpt_path}")
        ckpt = read_checkpoint(ckpt_path)
        script = os.path.basename(sys.argv[0])
        if ckpt.get('script', script) != script:  # the other script's checkpoint: another model, other state
            raise SystemExit(f"init_from='resume': {ckpt_path} was written by {ckpt['script']}, not {script}; resume "
                             f"it with {ckpt['script']}")
        check_resume(config, ckpt, [*ARCH_SETTINGS, *resume_keys], ckpt_path)
        saved_ranks = ckpt.get('world_size', world_size)  # checkpoints before it was stored: not checked
        if world_size is not None and saved_ranks != world_size:
            # the global batch, the steps per epoch and the batches each rank skips to reach the checkpoint's
            # place in its epoch all depend on it: resumed on other ranks, a run trains on other samples
            raise SystemExit(f"init_from='resume': {ckpt_path} was trained on {saved_ranks} processes, this run has "
                             f"{world_size}; resume it on {saved_ranks} (torchrun: nnodes x nproc_per_node = "
                             f"{saved_ranks}), or start a new run in a new out_dir")
        model_args = ckpt['model_args']  # the architecture the checkpoint was trained with
    else:
        model_args = new_model_args(config)
    model = load_model(model_args)
    return model, dict(model_args, pretrained=None), ckpt


def tome_patch(visual, tome_r, tome_cost, master):
    """The ToMe baseline (tome.py) on a plain tower, in training and evaluation, when tome_r or tome_cost is set:
    tome_cost picks the schedule of that fraction of the plain ViT's MMACs (r + 1 in the first blocks, r in the
    rest). The weights stay as they are. Prints the schedule that really runs (a block merges at most
    (tokens - 1) // 2)."""
    import flops  # here, not at the top: flops.py imports this file
    if tome_cost:
        try:
            tome_r = flops.tome_r_for_cost(visual.cfg, tome_cost, per_block=True)
        except ValueError as e:
            raise SystemExit(f'config error: {e}')
    if not tome_r:
        return
    tome.patch(visual, tome_r)
    if master:
        applied = tome.applied(visual.cfg.n_patches + 1, tome_r, len(visual.transformer.resblocks))
        print(f'ToMe: {flops.format_r(applied)} tokens merged per block, '
              f'{flops.tome_gmacs(visual.cfg, applied) * 1e3:.2f} MMACs per image '
              f'(plain ViT {flops.gmacs(visual.cfg) * 1e3:.2f})')


# ----------------------------------------------------------------------------------------------
# torchrun / DDP

def setup_distributed():
    """(rank, world_size, device) from torchrun's environment; a single process without it."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world_size, local_rank = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group('nccl', device_id=device)
    else:
        device = torch.device('cpu')
        dist.init_process_group('gloo')
    return rank, world_size, device


def teardown_distributed():
    """Leave the process group together: the ranks wait for each other, so that none tears gloo down while
    another is still in its last collective."""
    dist.barrier()
    dist.destroy_process_group()


def end_process(code=0, message=None):
    """Exit a torchrun rank whose process group is torn down, without the interpreter's final shutdown. Gloo's
    worker threads release a collective's work object (and the tensors it holds) a moment after the rank saw it
    complete; a tensor created in Python and released that way while Python is finalizing needs the GIL it can no
    longer get, and the process aborts ('terminate called without an active exception', SIGABRT: 5 of 100
    runs of the tests' self-critical DDP run on 2 busy cores), failing a run that had saved and logged everything
    (an open PyTorch bug, pytorch/pytorch#190489). The exit handlers still run (the loader workers end, tqdm
    closes); os._exit then skips only the finalization, in which the race lies."""
    if message is not None:
        print(message, file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def replica_checksums(parameters, world_size):
    """Every rank's sum of its weights, gathered: DDP keeps replicas identical, and checking it at the
    end of a run costs one all_gather, while a silent divergence would waste the run."""
    sums = torch.stack([p.detach().double().sum() for p in parameters])
    gathered = [torch.empty_like(sums) for _ in range(world_size)]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered), [g.sum().item() for g in gathered]


def finish_distributed(parameters, world_size, step, log):
    """The end of a torchrun run: log whether the replicas still hold the same weights (replica_checksums),
    leave the process group together (teardown_distributed) and end the process (end_process), failing only
    then if they do not, so that the log and the checkpoint are complete either way. Under torchrun it does
    not return. Nothing to do in a single process."""
    if world_size == 1:
        return
    in_sync, checksums = replica_checksums(parameters, world_size)
    log(dict(step=step, ranks_in_sync=in_sync, rank_checksums=checksums))
    teardown_distributed()
    if not in_sync:
        end_process(1, 'the DDP replicas hold different weights')
    end_process(0)


class Preemption:
    """SIGTERM (a scheduler preempting or timing out the job; torchrun passes it on to every rank) makes
    the run stop after the step in progress, save its checkpoint and exit, instead of dying mid-step
    and losing every step since the last checkpoint. Calling it says whether to stop now: under DDP
    the ranks agree (one all_reduce per step), so that all stop after the same step."""

    def __init__(self, world_size, device):
        self.world_size, self.device, self.signalled = world_size, device, False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.signalled = True

    def __call__(self):
        if self.world_size == 1:
            return self.signalled
        flag = torch.tensor(int(self.signalled), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, save, log, step, ckpt_path):
        """Save (every rank calls it), log it and end the run with a message that says how to go on."""
        save()
        log(dict(step=step, stopped_by='SIGTERM'))
        message = f'stopped by SIGTERM after step {step}; {ckpt_path} holds that step: continue with --init_from=resume'
        if self.world_size > 1:
            teardown_distributed()
            end_process(1, message)
        raise SystemExit(message)


def wrap_model(module, compile, world_size, device):
    """What the training step calls: module, compiled if asked (torch.compile), inside DDP under torchrun.
    Checkpoints, gradient clipping and the finiteness checks keep using module itself."""
    model = torch.compile(module) if compile else module
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)
    return model


def shapes_data(master, world_size, style='colour'):
    """The built-in shapes dataset of a style (data.shapes_paths, + its task: classnames, templates, groups),
    generated by rank 0 on first use (then reused) while the other ranks wait for it."""
    if master:
        data.make_shapes(style=style)
    if world_size > 1:
        dist.barrier()
    return dict(data.shapes_paths(data.shapes_root(style)), **data.shapes_task(style))


def autocast(device, precision):
    """bf16/fp16 autocast on CUDA for precision 'bf16'/'fp16'; fp32 otherwise (and on CPU)."""
    if device.type == 'cuda' and precision in ('bf16', 'fp16'):
        return torch.autocast('cuda', dtype=torch.bfloat16 if precision == 'bf16' else torch.float16)
    return contextlib.nullcontext()


def sync(device):
    """Wait for the GPU, so that step times measure the work and not its queueing."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def peak_memory_gb(device):
    """Peak memory allocated by tensors since the last reset (CUDA only; None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None


def reset_peak_memory(device):
    """Start peak_memory_gb's count afresh (each epoch reports its own peak); nothing to do on CPU."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------
# optimisation and checkpoints

def param_groups(named_parameters, weight_decay, router_lr_scale=1.0):
    """AdamW groups: no weight decay on norms, biases, embeddings, logit_scale (vectors, scalars and
    the position/token embeddings), as OpenCLIP and nanoGPT do. With router_lr_scale != 1 the boundary
    predictor (`predictor.` parameters) gets groups of its own, at lr x router_lr_scale (set_lr)."""
    groups = defaultdict(list)  # (decay, router) -> parameters
    for name, p in named_parameters:
        if p.requires_grad:
            decay = not (p.ndim < 2 or 'embedding' in name or 'logit_scale' in name)
            groups[decay, router_lr_scale != 1 and 'predictor.' in name].append(p)
    wd = {True: weight_decay, False: 0.0}
    return ([dict(params=groups[decay, False], weight_decay=wd[decay]) for decay in (True, False)]
            + [dict(params=groups[decay, True], weight_decay=wd[decay], lr_scale=router_lr_scale)
               for decay in (True, False) if groups[decay, True]])


def cosine_lr(step, max_steps, warmup_steps, lr, min_lr=0.0):
    """Linear warmup for warmup_steps, then cosine decay from lr to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Set the learning rate of every group to lr times the group's lr_scale (1 if it has none): in
    train_cls.py a finetune trains the pretrained backbone at a fraction of the new parts' lr."""
    for group in optimizer.param_groups:
        group['lr'] = group.get('lr_scale', 1.0) * lr


def grad_scaler(precision, device):
    """The GradScaler of a run: loss scaling is needed for fp16 on CUDA only (bf16 has fp32's range, and
    CPU runs fp32); disabled, its calls pass the loss and the step through unchanged."""
    return torch.amp.GradScaler(enabled=precision == 'fp16' and device.type == 'cuda')


def optimizer_step(loss, optimizer, scaler, parameters, grad_clip):
    """Backpropagate loss and take one optimizer step through the GradScaler. With grad_clip > 0 the
    gradients are unscaled first, so that their norm is clipped to grad_clip in true units; the scaler
    skips a step whose gradients hold an infinity (fp16 overflow) and lowers its scale."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def restore_optimizer(ckpt, optimizer, scaler, log_file, master):
    """Resume: the optimizer's and the GradScaler's state from the checkpoint, and, on rank 0, the log
    without the lines of steps after the checkpoint (trim_log), which the resumed run logs again."""
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    if master:
        trim_log(log_file, ckpt['step'])


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint.
    The temporary name is unique (two runs in one out_dir do not write into each other's file), and a
    failed write (disk full) removes it and stops the run with the path and the free space."""
    tmp = f'{path}.{uuid.uuid4().hex[:12]}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut cannot leave a renamed, empty file
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch reports a full disk as OSError or as RuntimeError('... file write failed')
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and 'write' in str(e)):
            where = os.path.dirname(path) or '.'  # gone if out_dir was deleted under the run
            free = 'no such directory'
            if os.path.isdir(where):
                free = f'{shutil.disk_usage(where).free / 2 ** 20:.0f} MiB free there'
            reason = os.strerror(e.errno) if getattr(e, 'errno', None) else str(e).splitlines()[0]
            raise SystemExit(f'could not write the checkpoint {path}: {reason} ({free}); '
                             f'the previous checkpoint, if any, is intact') from None
        raise


def save_run(path, module, optimizer, scaler, step, loss, device, world_size, master, **extra):
    """A training script's checkpoint: first the loss since the last log line and the weights are
    checked on every rank (stop_if_not_finite), so that NaN weights never replace a good checkpoint;
    then rank 0 saves module's state dict (as 'model', plain keys), the optimizer, the scaler, the step
    and extra (the config, model_args and what the script needs to resume)."""
    stop_if_not_finite([loss, *module.parameters()], step, path, device, world_size)
    if master:
        save_checkpoint(dict(model=unwrap(module).state_dict(), optimizer=optimizer.state_dict(),
                             scaler=scaler.state_dict(), step=step, script=os.path.basename(sys.argv[0]),
                             world_size=world_size, **extra), path)


def prepare_out_dir(out_dir, init_from, eval_only, master=True):
    """Create out_dir, unless a new run would replace the checkpoint in it (refuse_overwrite), lock it for
    this run (lock_out_dir, rank 0) and return the paths of its log (log.jsonl) and its checkpoint (ckpt.pt)."""
    refuse_overwrite(out_dir, init_from, eval_only)
    os.makedirs(out_dir, exist_ok=True)
    if master:
        lock_out_dir(out_dir)
    refuse_overwrite(out_dir, init_from, eval_only)  # again, now that no other run can be writing it
    log_file = os.path.join(out_dir, 'log.jsonl')
    if master and init_from != 'resume' and not eval_only and os.path.exists(log_file):
        # the log of a run that died before its first checkpoint: kept, but not mixed with this run's steps
        kept = os.path.join(out_dir, f'log.{time.strftime("%Y%m%d-%H%M%S")}.jsonl')
        os.replace(log_file, kept)
        print(f'{log_file}: the log of an earlier run without a checkpoint, moved to {kept}', file=sys.stderr)
    return log_file, os.path.join(out_dir, 'ckpt.pt')


_locks = []  # open lock files: a lock lasts as long as its file stays open, here the whole process


def lock_out_dir(out_dir):
    """Hold an exclusive lock on out_dir/.lock until the process ends. Two runs started into one out_dir
    would both pass refuse_overwrite before either saved, then replace each other's checkpoints."""
    f = open(os.path.join(out_dir, '.lock'), 'w')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS however the process ends
    except OSError:
        f.close()
        raise SystemExit(f"out_dir={out_dir!r} is in use by another run (it holds {out_dir}/.lock); wait for it to "
                         f"end or choose another out_dir")
    _locks.append(f)


def refuse_overwrite(out_dir, init_from, eval_only):
    """A new run into an out_dir that holds a checkpoint would replace it at its first save: refuse."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if init_from != 'resume' and not eval_only and os.path.exists(path):
        raise SystemExit(f"{path} exists: pass --init_from=resume to continue that run, or a new --out_dir "
                         f"(or delete it) to start another")


def check_resume(config, ckpt, keys, path):
    """Resuming takes the architecture (and the data position) from the checkpoint: a setting in keys
    that disagrees with the checkpoint's would be ignored, or skip the wrong samples, so refuse it.
    A checkpoint saved before a setting was renamed (RENAMED) is compared under the new name."""
    saved = ckpt.get('config', {})
    saved = {RENAMED.get(k, k) if RENAMED.get(k) not in saved else k: v for k, v in saved.items()}
    conflicts = [f'{k}={config[k]!r} (checkpoint: {saved[k]!r})' for k in keys if k in saved and saved[k] != config[k]]
    if conflicts:
        raise SystemExit(f"init_from='resume': {', '.join(conflicts)} differ from {path}; resume with the "
                         f"checkpoint's values, or start a new run in a new out_dir to change them")


def _diverged(step, ckpt_path):
    kept = f'{ckpt_path} is left as it was' if os.path.exists(ckpt_path) else 'no checkpoint was written'
    return SystemExit(f'step {step}: the loss or the weights are NaN or infinite, training diverged; stopped, '
                      f'{kept}. Try a lower lr or grad_clip > 0')


def stop_if_not_finite(tensors, step, ckpt_path, device, world_size):
    """Stop every rank when a tensor (the loss summed since the last check, the weights) holds a NaN or
    an infinity: a diverged run must not overwrite the last good checkpoint. One host sync (and one
    all_reduce under DDP, so that all ranks stop together): called at log and checkpoint time, not per step."""
    finite = torch.stack([torch.as_tensor(t, device=device).isfinite().all() for t in tensors]).all().int()
    if world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise _diverged(step, ckpt_path)


@contextlib.contextmanager
def divergence_is_an_error(parameters, step, ckpt_path):
    """Around the forward pass: diverged weights (NaN, or finite but so large that activations overflow)
    can make it crash, as learned pooling turns a NaN segment count into an integer, before the next
    check sees them. Such a crash is reported as the divergence it is."""
    try:
        yield
    except (ValueError, RuntimeError) as e:
        if 'NaN' not in str(e) and all(p.isfinite().all() for p in parameters):
            raise
        raise _diverged(step, ckpt_path) from None


def trim_log(path, step):
    """On resume, drop the log lines of steps after the checkpoint: the interrupted run's, which the
    resumed run trains (and logs) again. Lines without a step (the run headers) stay; a line cut short
    by a kill goes."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()

    def keep(line):
        try:
            return json.loads(line).get('step', 0) <= step
        except ValueError:
            return False
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        with open(path + '.tmp', 'w') as f:
            f.writelines(kept)
        os.replace(path + '.tmp', path)


def together(batches, world_size, device):
    """The batches, for as long as every rank has one: under DDP, a rank whose shards ran out early would
    leave the others waiting at their next collective. One all_reduce (and host sync) per step, DDP only."""
    for batch in itertools.chain(batches, [None]):
        if world_size > 1:
            have = torch.tensor(int(batch is not None), device=device)
            dist.all_reduce(have, op=dist.ReduceOp.MIN)
            batch = batch if have.item() else None
        if batch is None:
            return
        yield batch


def step_seed(seed, rank, step):
    """A seed for the global RNG at a step: a function of (seed, rank, step) alone, so that a resumed
    run draws the same random numbers from that step on as the run it continues."""
    return hash((seed, rank, step))


def unwrap(model):
    """The module inside DDP and torch.compile wrappers (whose state dict keys are the plain ones)."""
    model = getattr(model, 'module', model)
    return getattr(model, '_orig_mod', model)


def log_jsonl(path, record):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def make_logger(log_file, master):
    """log(record): on rank 0, one line on the console (above tqdm's bar) and one JSON line in log_file;
    nothing on the other ranks, so that every rank can call it wherever the run logs."""
    def log(record):
        if master:
            tqdm.write(' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in record.items()))
            log_jsonl(log_file, record)
    return log


def accumulate(stats, *sums):
    """Add a step's stats to each dict of running sums (e.g. the log interval's and the epoch's).
    Tensors are detached and stay on the device: no host sync per step; one per log line."""
    for k, v in stats.items():
        v = v.detach() if torch.is_tensor(v) else v
        for total in sums:
            total[k] = total[k] + v


def interval_record(window, step, epoch, lr, samples_per_step, device, skipped, **extra):
    """The log line of a log interval from window, its sums (and 'n', its number of steps), which it
    empties for the next interval: the mean of each sum, lr and extra (e.g. logit_scale), the throughput
    (samples_per_step: over all ranks), peak memory and the count of skipped samples."""
    n = window.pop('n')
    record = dict(step=step, epoch=epoch, **{k: float(v) / n for k, v in window.items()}, lr=lr, **extra,
                  samples_per_s=n * samples_per_step / (window['step_time'] + window['data_time']),
                  mem_gb=peak_memory_gb(device), skipped=skipped)
    window.clear()
    return record


# ----------------------------------------------------------------------------------------------
# evaluation

def segment_quality(segment_ids, object_patches):
    """Per-image sums that say how well segments follow objects, for a batch of (B, N) segment ids
    and (B, N) bool object patches (both row-major): `pure` segments (all object or all background)
    and `segments` in all; `object_tokens`, the segments touching the object per object patch, summed
    over the `images_with_object`."""
    B, N = segment_ids.shape
    ones = torch.ones_like(segment_ids, dtype=torch.float)
    size = ones.new_zeros(B, N).scatter_add_(1, segment_ids, ones)                  # patches per segment
    on_object = ones.new_zeros(B, N).scatter_add_(1, segment_ids, object_patches.float())
    exists = size > 0
    pure = exists & ((on_object == 0) | (on_object == size))
    n_object = object_patches.sum(1)
    touching = (on_object > 0).sum(1)
    has_object = n_object > 0
    return dict(pure=pure.sum().item(), segments=exists.sum().item(),
                object_tokens=(touching[has_object] / n_object[has_object]).sum().item(),
                images_with_object=has_object.sum().item())


def boundary_confidence(logits, boundaries):
    """Per-image sums that say whether the predictor looks at the image: the standard deviation of
    its boundary probabilities over the patches (`prob_std`; a content-blind predictor is near 0)
    and the `margin` between the mean probability of the chosen boundaries and of the other patches.
    The last patch, a boundary by construction, is left out."""
    p, chosen = torch.sigmoid(logits.float())[:, :-1], boundaries[:, :-1] > 0
    n_chosen = chosen.sum(1)
    both = (n_chosen > 0) & (n_chosen < chosen.shape[1])
    margin = ((p * chosen).sum(1) / n_chosen.clamp(min=1) - (p * ~chosen).sum(1) / (~chosen).sum(1).clamp(min=1))
    return dict(prob_std=p.std(1, unbiased=False).sum().item(), margin=margin[both].sum().item(),
                images_with_margin=both.sum().item())


def calibrate_threshold(visual, loader, device, precision='fp32'):
    """routers.py's router evaluated with eval_boundaries='threshold': its cut threshold, set on the images of
    loader (labels unused) so that their mean segment count is the target (RouterViT.calibrate): per-image
    counts at top-k's mean cost. Returns what to log ({} for any other tower)."""
    if visual.cfg.eval_boundaries != 'threshold' or not hasattr(visual, 'calibrate'):
        return {}
    with autocast(device, precision):  # as evaluation computes the scores
        threshold, _ = visual.calibrate(batch[0].to(device) for batch in loader if batch is not None)
    return dict(cut_threshold=threshold)


@torch.no_grad()
def evaluate(logits_fn, loader, device, precision='fp32', object_patches=None, groups=None):
    """Top-1/top-5 accuracy (percent) and the achieved compression of logits_fn(images) -> (logits, aux)
    over a loader of (images, labels) batches (None batches skipped). With object_patches ((n, N) bool,
    one row per image in loader order, see data.shapes_object_patches), also segment_purity,
    object_tokens and, when there is a predictor, its boundary_prob_std and boundary_margin (see
    segment_quality, boundary_confidence), over the batches that lost no unreadable image.
    groups: optional {name: (classes,) tensor of group ids}; adds `{name}_top1`, the percent of images
    whose top-1 class is in the right group (for shapes: the right colour, the right shape)."""
    correct1 = correct5 = n = patches = segments = 0
    sums = defaultdict(float)
    groups = {name: g.to(device) for name, g in (groups or {}).items()}
    for i, batch in enumerate(loader):
        if batch is None:  # every image of it unreadable (data.collate), and counted as skipped
            continue
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device, precision):
            logits, aux = logits_fn(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top5[:, 0] == labels).sum().item()
        correct5 += (top5 == labels[:, None]).any(dim=1).sum().item()
        for name, g in groups.items():
            sums[f'{name}_top1'] += (g[top5[:, 0]] == g[labels]).sum().item()
        objects = None if object_patches is None else object_patches[i * loader.batch_size:][:loader.batch_size]
        if objects is not None and len(objects) == len(labels):  # else an image was skipped: rows unknown
            sums['images'] += len(labels)
            for k, v in segment_quality(aux['segment_ids'], objects.to(device)).items():
                sums[k] += v
            if 'boundary_logits' in aux:
                for k, v in boundary_confidence(aux['boundary_logits'], aux['boundaries']).items():
                    sums[k] += v
        n += len(labels)
        patches += aux['boundaries'].numel()
        segments += aux['n_segments'].sum().item()
    if not n:  # every val image unreadable (and counted as skipped): no accuracy, but no crash mid-run either
        print('evaluation: no readable image in the val set; accuracy logged as NaN', file=sys.stderr)
        return dict(top1=math.nan, top5=math.nan, compression=math.nan)
    result = dict(top1=100 * correct1 / n, top5=100 * correct5 / n, compression=patches / segments)
    result.update({f'{name}_top1': 100 * sums[f'{name}_top1'] / n for name in groups})
    if sums['images']:
        result.update(segment_purity=sums['pure'] / sums['segments'],
                      object_tokens=sums['object_tokens'] / max(1, sums['images_with_object']))
        if 'prob_std' in sums:
            result.update(boundary_prob_std=sums['prob_std'] / sums['images'],
                          boundary_margin=sums['margin'] / max(1, sums['images_with_margin']))
    return result


def save_segments_png(path, images, segment_ids, grid_size, mean, std, nrow=8):
    """Save a grid of images with their segments drawn on them, from (B, N) row-major segment ids:
    patches of one segment share a tint, and a white line separates neighbouring patches of
    different segments, so a segment shows as the 2D region it is in any scan order (in raster
    order one may wrap from the end of a row to the start of the next)."""
    from PIL import Image, ImageDraw
    images = images.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    images = images.clamp(0, 1)
    if images.shape[-1] < 96:  # small images (the 48 px demo): enlarged, so that the segments can be seen
        images = torch.nn.functional.interpolate(images, scale_factor=math.ceil(96 / images.shape[-1]))
    images = (images * 255).byte().permute(0, 2, 3, 1).numpy()
    seg = segment_ids.view(-1, *grid_size).cpu()
    H, W = images.shape[1:3]
    ph, pw = H // grid_size[0], W // grid_size[1]
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
    ncol = min(nrow, len(images))
    sheet = Image.new('RGB', (ncol * (W + 2), math.ceil(len(images) / ncol) * (H + 2)), 'white')
    for i, (image, s) in enumerate(zip(images, seg)):
        tile = Image.fromarray(image)
        tint = Image.new('RGB', tile.size)
        draw = ImageDraw.Draw(tint)
        for r in range(grid_size[0]):
            for c in range(grid_size[1]):
                draw.rectangle([c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1], fill=palette[s[r, c] % len(palette)])
        tile = Image.blend(tile, tint, 0.3)
        draw = ImageDraw.Draw(tile)
        for r in range(grid_size[0]):
            for c in range(grid_size[1]):
                if c + 1 < grid_size[1] and s[r, c] != s[r, c + 1]:
                    draw.line([((c + 1) * pw, r * ph), ((c + 1) * pw, (r + 1) * ph)], fill='white')
                if r + 1 < grid_size[0] and s[r, c] != s[r + 1, c]:
                    draw.line([(c * pw, (r + 1) * ph), ((c + 1) * pw, (r + 1) * ph)], fill='white')
        sheet.paste(tile, ((i % ncol) * (W + 2), (i // ncol) * (H + 2)))
    sheet.save(path)


def save_val_segments(path, visual, loader, device, precision):
    """save_segments_png of the segments the image tower `visual` predicts on the first 16 images of
    loader: where the boundaries fall, which the compression figures alone do not show."""
    batch = next((b for b in loader if b is not None), None)  # None: every image of a batch unreadable
    if batch is None:
        return
    images = batch[0][:16].to(device)
    with torch.no_grad(), autocast(device, precision):
        segment_ids = visual(images)[1]['segment_ids']
    save_segments_png(path, images, segment_ids, visual.grid_size, open_clip.OPENAI_DATASET_MEAN,
                      open_clip.OPENAI_DATASET_STD)
