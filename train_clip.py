"""
CLIP-style contrastive training of a DTP-ViT image tower with OpenCLIP's text tower, with
zero-shot evaluation. Single process or torchrun DDP.

    python train_clip.py                                   # the CPU demo: a small DTP-ViT CLIP on built-in shapes data
    python train_clip.py config/shapes_router4x.py         # the same with routers.py's learned router
    python train_clip.py config/shapes_fixed4x.py --max_steps=200
    torchrun --standalone --nproc_per_node=8 train_clip.py config/cc12m_10x.py

Settings are the globals below; a config file (Python, executed in order) and then --key=value
pairs override them. An unknown key or a value of the wrong type stops the run before it starts.
"""
import itertools
import math
import os
import time
from collections import defaultdict

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip import zero_shot_metadata
from tqdm import tqdm

import data
import routers
import tome
from train_utils import (accumulate, autocast, calibrate_threshold, check_settings, config_keys, configure, cosine_lr,
                         Preemption, divergence_is_an_error, evaluate, finish_distributed, grad_scaler, init_model,
                         interval_record, make_logger, optimizer_step, param_groups, peak_memory_gb, prepare_out_dir,
                         reset_peak_memory, restore_optimizer, save_run, save_val_segments, set_lr, setup_distributed,
                         shapes_data, step_seed, tome_patch, stop_if_not_finite, sync, together, unwrap, wrap_model)

# -----------------------------------------------------------------------------------------------
# defaults: the CPU demo, a small CLIP with the paper's DTP-ViT at 4x, on the built-in shapes data at 48 px (~7 minutes
# on 2 cores); the CC12M run is config/cc12m_10x.py
# I/O
out_dir = 'out/clip-shapes'
init_from = 'scratch'       # 'scratch', 'resume' (out_dir/ckpt.pt), or an OpenCLIP checkpoint file or tag
eval_only = False           # evaluate init_from and exit
log_interval = 10           # steps between log lines
eval_interval = 0           # steps between zero-shot evaluations, from step 0 (0: only at the end)
ckpt_interval = 250         # steps between checkpoints (and one at the end)
# data
train_data = 'shapes'       # 'shapes' (built-in, generated on first use) or a webdataset pattern of shards
shapes_style = 'colour'     # the built-in data's style: 'colour', 'clutter' or 'count' (data.py)
train_num_samples = 0       # samples per epoch of webdataset shards (required); for 'shapes', its first N (0: all)
imagenet_val = None         # ImageNet val folder (one sub-folder per class) for zero-shot evaluation
workers = 2                 # dataloader processes per GPU (shards and eval; 'shapes' trains from memory)
# model: an OpenCLIP architecture, resized by the two dicts for the demo
arch = 'ViT-B-32'           # OpenCLIP config name of both towers
vision = dict(image_size=48, patch_size=8, width=128, heads=4, embed_dim=128)  # DTPConfig overrides (None: none)
text = dict(width=128, heads=4, layers=2, context_length=32)  # OpenCLIP text_cfg overrides (None: none)
pre_layers = 2              # full-length blocks before pooling
short_layers = 4            # blocks after pooling (None: the architecture's depth minus pre_layers)
boundary = 'gumbel'         # 'gumbel' (the paper), 'fixed' or 'none' (plain ViT); routers.py: 'router', 'color', 'cosine'
compression = 4.0           # target patches per segment
temperature = 0.5           # Gumbel-Sigmoid temperature
eval_boundaries = 'topk'    # 'topk' (round(N / compression) per image) or 'threshold' (p > 0.5; routers.py: calibrated)
pool = 'cls'                # image embedding: 'cls' token or 'mean' of the segments
router = None               # routers.py's settings (RouterConfig fields) for its rules, e.g. dict(min_segment=2)
tome_r = 0                  # ToMe (tome.py) on the plain ViT: tokens merged per block (0: off)
tome_cost = 0.0             # ToMe: the schedule whose MMACs are nearest this fraction of the plain ViT's (0: off)
# optimisation
batch_size = 128            # per GPU
epochs = 16
max_steps = 0               # stop after this many steps (0: epochs x steps per epoch)
lr = 2e-3
min_lr = 1e-5
warmup_steps = 100
lr_decay_steps = 0          # length of the cosine schedule (0: the total number of steps)
weight_decay = 0.1
boundary_loss_weight = 1.0  # weight of the boundary prior (the DTP paper uses 1)
grad_clip = 1.0             # max gradient norm (0: off)
precision = 'bf16'          # 'bf16', 'fp16' or 'fp32'; autocast on CUDA only, CPU runs fp32
compile = False             # torch.compile the model
seed = 0
# -----------------------------------------------------------------------------------------------
config = configure({k: globals()[k] for k in config_keys(globals())})
check_settings(config)
globals().update(config)
if tome_r or tome_cost:
    tome.check_settings(tome_r, tome_cost, boundary)

rank, world_size, device = setup_distributed()
master = rank == 0
log_file, ckpt_path = prepare_out_dir(out_dir, init_from, eval_only, master)
log = make_logger(log_file, master)

# data ------------------------------------------------------------------------------------------
use_shapes = train_data == 'shapes'
if use_shapes:
    shapes = shapes_data(master, world_size, shapes_style)
    train_data = shapes['shards']
elif not eval_only:
    if not train_num_samples:
        raise SystemExit('config error: train_num_samples must be set for webdataset shards')
    missing = [u for u in data.expand_urls(train_data) if '://' not in u and not os.path.exists(u)]
    if missing:
        raise SystemExit(f'train_data {train_data!r}: {len(missing)} shards not found, e.g. {missing[0]} '
                         f"(expected img2dataset output, e.g. '/data/cc12m/{{00000..01242}}.tar')")

# model -----------------------------------------------------------------------------------------
torch.manual_seed(seed)  # the same initial weights on every rank
# resuming, the architecture comes from the checkpoint, and the data settings fix which samples it has seen
# (the batches skipped to reach its position); ToMe's settings may change only for evaluation (a plain
# run's model evaluated with ToMe, training-free)
clip, model_args, ckpt = init_model(config, ckpt_path, resume_keys=['batch_size'] + (
    [] if eval_only else ['seed', 'train_data', 'shapes_style', 'train_num_samples', 'tome_r', 'tome_cost']),
    world_size=None if eval_only else world_size)
if ckpt is not None:
    clip.load_state_dict(ckpt['model'])
tome_patch(clip.visual, tome_r, tome_cost, master)  # the ToMe baseline, when set
clip.to(device)
vision_cfg = clip.visual.cfg
tokenizer = open_clip.get_tokenizer(model_args['model_name'], context_length=clip.text.context_length)
train_transform, val_transform = data.image_transforms(clip.visual.cfg.image_size)

class_groups = None  # shapes: also the accuracy of the colour alone and of the shape alone
if imagenet_val:
    val_root, val_split = os.path.split(os.path.normpath(imagenet_val))
    classnames, templates = zero_shot_metadata.IMAGENET_CLASSNAMES, zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    try:  # every rank: one that stopped alone would leave the others waiting
        data.check_imagenet_classes(val_root, val_split)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'imagenet_val={imagenet_val!r}: {e}')
elif use_shapes:
    val_root, val_split, classnames, templates = shapes['root'], 'val', shapes['classnames'], shapes['templates']
    class_groups = shapes['groups']
else:
    val_root = None
val_loader = (data.folder_loader(val_root, val_split, val_transform, batch_size, workers=workers)
              if val_root and master else None)
# On shapes the objects' exact masks are known, so evaluation also measures how well segments follow them.
object_patches = (data.shapes_object_patches([p for p, _ in val_loader.dataset.samples], val_transform,
                                             clip.visual.cfg.patch_size) if use_shapes and val_loader else None)


def zero_shot(step):
    """Zero-shot top-1/top-5 on the validation folder and a picture of the predicted segments."""
    model = unwrap(clip)
    model.eval()
    with autocast(device, precision):
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, templates, device=device)

    def logits_fn(images):
        features, aux = model.visual(images)
        return torch.nn.functional.normalize(features, dim=-1) @ classifier.to(features.dtype), aux
    threshold = calibrate_threshold(model.visual, val_loader, device, precision)
    result = dict(evaluate(logits_fn, val_loader, device, precision, object_patches, class_groups), **threshold)
    save_val_segments(os.path.join(out_dir, f'boundaries_{step}.png'), model.visual, val_loader, device, precision)
    model.train()
    gain = getattr(getattr(model.visual, 'predictor', None), 'color_gain', None)  # routers.py's learned router
    if gain is not None:  # how much its logits still weigh colour changes
        result['color_gain'] = gain.item()
    return dict(step=step, zeroshot_top1=result.pop('top1'), zeroshot_top5=result.pop('top5'),
                eval_compression=result.pop('compression'), **result)


if eval_only:
    if not val_loader and master:
        raise SystemExit('eval_only: nothing to evaluate on; set imagenet_val to an ImageNet val folder')
    if master:
        log(zero_shot(ckpt['step'] if ckpt else 0))
    raise SystemExit

# optimisation ----------------------------------------------------------------------------------
try:  # too few shards or samples for the ranks, workers and batch size: a config error, not a traceback
    if use_shapes:  # small enough for RAM: decoded once, not every step (see data.memory_loader)
        loader = data.memory_loader(train_data, train_transform, tokenizer, batch_size, train_num_samples, seed=seed,
                                    rank=rank, world_size=world_size)
    else:
        loader = data.wds_loader(train_data, train_transform, tokenizer, batch_size, train_num_samples, train=True,
                                 workers=workers, seed=seed, rank=rank, world_size=world_size)
except ValueError as e:
    raise SystemExit(f'train_data={train_data!r}: {e}; use more shards or samples, or fewer workers or a smaller '
                     f'batch_size')
total_steps = max_steps or epochs * loader.num_batches
router_lr_scale = getattr(vision_cfg, 'lr_scale', 1.0)  # routers.py's predictor trains at its own lr
optimizer = torch.optim.AdamW(param_groups(clip.named_parameters(), weight_decay, router_lr_scale), lr=lr,
                              betas=(0.9, 0.98), eps=1e-6, fused=True)
scaler = grad_scaler(precision, device)
step = 0
epoch, seen = 0, 0  # the epoch and how many of its batches were trained on
if ckpt is not None:
    restore_optimizer(ckpt, optimizer, scaler, log_file, master)
    step = ckpt['step']
    # epochs that came up short make step // num_batches drift from the epoch; older checkpoints lack epoch_step
    epoch, seen = (ckpt['epoch'], ckpt['epoch_step']) if 'epoch_step' in ckpt else divmod(step, loader.num_batches)
    del ckpt
loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank,
                             world_size=world_size)
model = wrap_model(clip, compile, world_size, device)


def pair_losses(out):
    """Each local image-text pair's own contrastive loss, (B,): the mean of its image's and its text's
    cross-entropy, from ClipLoss's own logits (over the global batch under DDP), whose mean is ClipLoss."""
    with torch.no_grad():
        per_image, per_text = loss_fn.get_logits(out['image_features'], out['text_features'], out['logit_scale'])
        labels = loss_fn.get_ground_truth(per_image.device, per_image.shape[0])
        return (F.cross_entropy(per_image.float(), labels, reduction='none')
                + F.cross_entropy(per_text.float(), labels, reduction='none')) / 2


def checkpoint():
    save_run(ckpt_path, clip, optimizer, scaler, step, window.get('loss', 0.0), device, world_size, master,
             epoch=epoch, epoch_step=seen, config=config, model_args=model_args)


log(dict(params_M=sum(p.numel() for p in clip.parameters()) / 1e6, steps=total_steps,
         steps_per_epoch=loader.num_batches, world_size=world_size, device=str(device)))
bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
model.train()
window = defaultdict(float)  # sums over the current log interval (tensors stay on the device until logged)
epoch_stats = defaultdict(float)
if seen >= loader.num_batches:  # checkpointed at the end of an epoch
    epoch, seen = epoch + 1, 0
preempted = Preemption(world_size, device)  # SIGTERM: save after this step and exit
if eval_interval and step == 0:  # as nanoGPT, also before the first step: a finetune's starting point
    if val_loader:
        log(zero_shot(step))
    if world_size > 1:
        dist.barrier()  # the other ranks wait while rank 0 evaluates
while step < total_steps:
    loader.set_epoch(epoch)
    reset_peak_memory(device)
    batches = iter(loader)
    got = 0  # batches this epoch yielded: fewer than promised when shards are short, empty or unreadable
    if seen:  # resumed mid-epoch: skip what the checkpointed run already trained on (data only)
        log(dict(resume_step=step, epoch=epoch, skipping_batches=seen))
        got = sum(1 for _ in itertools.islice(batches, seen))
    t0 = time.perf_counter()
    for images, texts in together(batches, world_size, device):
        if preempted():  # before this batch counts as seen: the resumed run trains on it
            preempted.stop(checkpoint, log, step, ckpt_path)
        got += 1
        # Gumbel noise from a seed per rank and step: a resumed run draws what the uninterrupted one drew
        torch.manual_seed(step_seed(seed, rank, step))
        images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
        sync(device)
        t1 = time.perf_counter()
        set_lr(optimizer, cosine_lr(step, lr_decay_steps or total_steps, warmup_steps, lr, min_lr))
        with autocast(device, precision), divergence_is_an_error(clip.parameters(), step, ckpt_path):
            out = model(images, texts)
            contrastive = loss_fn(out['image_features'], out['text_features'], out['logit_scale'])
            loss = contrastive + boundary_loss_weight * out['boundary_loss']
            if 'boundary_log_prob' in out:  # routers.py's router: REINFORCE, a pair's own loss rewards its image's cuts
                greedy = F.normalize(out['greedy_features'], dim=-1).to(out['image_features'].dtype)
                reinforce = routers.reinforce_loss(out, pair_losses(out), pair_losses(dict(out, image_features=greedy)),
                                                   vision_cfg.distortion_weight)
                loss = loss + reinforce
        optimizer_step(loss, optimizer, scaler, clip.parameters(), grad_clip)
        with torch.no_grad():  # as OpenCLIP: a temperature below 1/100 makes the loss unstable
            unwrap(clip).logit_scale.clamp_(0, math.log(100))
        sync(device)
        t2 = time.perf_counter()
        step += 1
        seen += 1

        if 'boundary_log_prob' in out:
            accumulate(dict(reinforce=reinforce, distortion=out['pooling_distortion'].mean()), window)
        accumulate(dict(loss=loss, contrastive=contrastive, boundary=out['boundary_loss'],
                        compression=out['compression'], step_time=t2 - t1, data_time=t1 - t0, n=1), window)
        accumulate(dict(step_time=t2 - t1, n=1), epoch_stats)
        bar.update()
        if step % log_interval == 0 or step == total_steps:
            stop_if_not_finite([window['loss']], step, ckpt_path, device, world_size)
            record = interval_record(window, step, epoch + seen / loader.num_batches, optimizer.param_groups[0]['lr'],
                                     batch_size * world_size, device, loader.skipped(),
                                     logit_scale=unwrap(clip).logit_scale.exp().item())
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", compression=f"{record['compression']:.2f}")
        if eval_interval and step % eval_interval == 0 and step < total_steps and val_loader:
            log(zero_shot(step))
        if step % ckpt_interval == 0 and step < total_steps:
            checkpoint()
        if world_size > 1 and eval_interval and step % eval_interval == 0:
            dist.barrier()  # the other ranks wait while rank 0 evaluates
        t0 = time.perf_counter()
        if step >= total_steps:
            break
    ran_out = step < total_steps  # the loader ran out of batches (as planned, or short), rather than the steps
    if ran_out and not got:
        raise SystemExit(f'train_data {train_data!r}: epoch {epoch} yielded no batch of {batch_size} at all '
                         f'({loader.skipped()} bad samples or shards skipped so far): the shards are empty, '
                         f'unreadable, or hold fewer than batch_size good samples per reader')
    if ran_out and got < loader.num_batches:  # end it and move on: re-entering it would skip batches that are gone
        log(dict(short_epoch=epoch, step=step, batches=got, expected_batches=loader.num_batches,
                 samples_short=(loader.num_batches - got) * batch_size * world_size, skipped=loader.skipped()))
    # the efficiency metrics (step time, peak memory), averaged per epoch
    log(dict(epoch_end=epoch, step=step, avg_step_time=epoch_stats['step_time'] / max(1, epoch_stats['n']),
             peak_mem_gb=peak_memory_gb(device)))
    epoch_stats.clear()
    if ran_out:
        epoch, seen = epoch + 1, 0
bar.close()
checkpoint()
if val_loader:
    log(zero_shot(step))
finish_distributed(clip.parameters(), world_size, step, log)
