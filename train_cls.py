"""
Image classification with a DTP-ViT backbone and a linear head: a linear probe of a frozen
(pretrained) CLIP image tower, or a finetune of all of it. Single process or torchrun DDP.

    python train_cls.py                                    # the CPU demo: a small DTP-ViT from scratch on shapes
    python train_cls.py config/shapes_cls_tiny.py          # seconds, for tests and smoke checks
    torchrun --standalone --nproc_per_node=8 train_cls.py config/imagenet_linear_10x.py

Settings are the globals below; a config file (Python, executed in order) and then --key=value
pairs override them. An unknown key or a value of the wrong type stops the run before it starts.

The head always sees the L2-normalised image embedding. With head_init='zeroshot' its weights are
CLIP's logit scale times the text tower's zero-shot classifier, so before any training its logits
ARE CLIP's zero-shot logits; 'random' uses random directions of the same norm and nothing else.
"""
import os
import time
from collections import defaultdict

import open_clip
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from open_clip import zero_shot_metadata
from tqdm import tqdm

import data
import model as dtp_vit
import routers
import tome
from train_utils import (accumulate, autocast, calibrate_threshold, check_settings, config_keys, configure, cosine_lr,
                         Preemption, divergence_is_an_error, evaluate, finish_distributed, grad_scaler, init_model,
                         interval_record, make_logger, optimizer_step, param_groups, peak_memory_gb, prepare_out_dir,
                         reset_peak_memory, restore_optimizer, save_run, save_val_segments, set_lr, setup_distributed,
                         shapes_data, step_seed, stop_if_not_finite, tome_patch, sync, unwrap, wrap_model)

# -----------------------------------------------------------------------------------------------
# defaults: the CPU demo, a small DTP-ViT (4x pooling) trained from scratch on the shapes folders at 48 px
# (36 patches: as accurate as 64 px here and 1.6x faster), ~5.5 minutes on 2 cores, 94% val top-1
# I/O
out_dir = 'out/cls-shapes'
init_from = 'scratch'       # 'scratch', 'resume' (out_dir/ckpt.pt), or an OpenCLIP checkpoint file or tag
eval_only = False           # evaluate the initial model (e.g. the zero-shot head) and exit
log_interval = 10           # steps between log lines
ckpt_interval = 250         # steps between checkpoints (and one at the end); evaluation is per epoch
# data
data_dir = 'shapes'         # 'shapes' (built-in, generated on first use) or an ImageNet root with train/ and val/
shapes_style = 'colour'     # the built-in data's style: 'colour', 'clutter' or 'count' (data.py)
workers = 0                 # dataloader processes per GPU (0 for the demo: on 2 cores, workers slow the model)
# model: an OpenCLIP architecture, resized by the two dicts for the demo (as in train_clip.py)
arch = 'ViT-B-32'           # OpenCLIP config name
vision = dict(image_size=48, patch_size=8, width=128, heads=4, embed_dim=128)  # DTPConfig overrides (None: none)
text = dict(width=128, heads=4, layers=2, context_length=32)  # text_cfg overrides; the text tower is only
                            # used to build a zero-shot head, and dropped afterwards
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
head_init = 'auto'          # 'zeroshot', 'random', or 'auto': zeroshot when init_from is a checkpoint, else random
freeze_backbone = False     # True: train only what is new (the head and the boundary predictor)
backbone_lr_scale = 0.1     # finetuning: lr multiplier of pretrained weights (a backbone from scratch trains at lr)
# optimisation
batch_size = 128            # per GPU
epochs = 15
max_steps = 0               # stop after this many steps (0: epochs x steps per epoch)
lr = 1e-3
min_lr = 1e-5
warmup_steps = 100
lr_decay_steps = 0          # length of the cosine schedule (0: the total number of steps)
weight_decay = 0.05
label_smoothing = 0.1
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
if head_init not in ('auto', 'zeroshot', 'random'):
    raise SystemExit(f"config error: head_init={head_init!r}, expected 'auto', 'zeroshot' or 'random'")

rank, world_size, device = setup_distributed()
master = rank == 0
log_file, ckpt_path = prepare_out_dir(out_dir, init_from, eval_only, master)
log = make_logger(log_file, master)

# data: two ImageFolders; a missing or malformed one fails here, with the layout it expects ------
if data_dir == 'shapes':
    shapes = shapes_data(master, world_size, shapes_style)
    data_root, classnames, templates = shapes['root'], shapes['classnames'], shapes['templates']
else:
    data_root = data_dir
    classnames, templates = zero_shot_metadata.IMAGENET_CLASSNAMES, zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
try:
    train_set = data.imagenet_dataset(data_root, 'train')  # transforms are set once the image size is known
    val_set = data.imagenet_dataset(data_root, 'val')
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'data_dir={data_dir!r}: {e}')
if val_set.classes != train_set.classes:
    raise SystemExit(f'{data_root}: train/ and val/ have different class folders')

# model: the CLIP image tower + a linear head on its normalised embedding -------------------------
class Classifier(nn.Module):
    def __init__(self, visual, n_classes):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.cfg.embed_dim, n_classes)

    def forward(self, images):
        features, aux = self.visual(images)
        return self.head(F.normalize(features, dim=-1)), aux


torch.manual_seed(seed)  # the same initial head and predictor in every run with this seed
# resuming, the architecture and the optimizer's groups come from the checkpoint; batch_size fixes the data position
# (ToMe's settings may change only for evaluation, as in train_clip.py)
clip, model_args, ckpt = init_model(config, ckpt_path, resume_keys=['freeze_backbone', 'backbone_lr_scale',
                                                                     'batch_size'] + (
                                        [] if eval_only else ['shapes_style', 'tome_r', 'tome_cost']),
                                    world_size=None if eval_only else world_size)
if ckpt is not None and ckpt.get('classes', train_set.classes) != train_set.classes:  # another head, or worse, other labels
    raise SystemExit(f"init_from='resume': {data_root}/train has {len(train_set.classes)} class folders "
                     f"({', '.join(train_set.classes[:3])}, ...), the checkpoint's run {len(ckpt['classes'])} "
                     f"({', '.join(ckpt['classes'][:3])}, ...); resume on its data_dir, or start a new run")
pretrained = ckpt['pretrained_backbone'] if ckpt is not None else init_from != 'scratch'  # as the checkpointed run
net = Classifier(clip.visual, len(train_set.classes)).to(device)
tome_patch(net.visual, tome_r, tome_cost, master)  # the ToMe baseline, when set
if ckpt is not None:
    net.load_state_dict(ckpt['model'])
else:
    head_init = head_init if head_init != 'auto' else 'zeroshot' if pretrained else 'random'
    if head_init == 'zeroshot':
        # The text tower embeds every "template(class name)" prompt; the normalised class means form
        # the zero-shot classifier (embed_dim, n_classes).
        if len(classnames) != len(train_set.classes):
            raise SystemExit(f"head_init='zeroshot': {len(classnames)} class names (ImageNet's), but "
                             f'{len(train_set.classes)} class folders in {data_root}/train')
        tokenizer = open_clip.get_tokenizer(model_args['model_name'], context_length=clip.text.context_length)
        clip.to(device).eval()
        with autocast(device, precision):
            directions = open_clip.build_zero_shot_classifier(clip, tokenizer, classnames, templates, device=device).T
    else:
        directions = F.normalize(torch.randn_like(net.head.weight), dim=-1)
    # Either way each class gets a weight vector of norm logit_scale (CLIP's inverse temperature: 1/0.07
    # untrained, 100 for laion2b), so the logits are CLIP's: logit_scale * cos(image, class). The two inits
    # differ in the directions only. (nn.Linear's default init on a unit vector would give logits ~0.1
    # that take hundreds of steps to grow: the demo learned several times slower.)
    with torch.no_grad():
        net.head.weight.copy_(clip.logit_scale.exp() * directions.float())
        net.head.bias.zero_()
del clip  # the text tower is not trained: keep it out of memory, the optimizer and DDP
train_transform, val_transform = data.image_transforms(net.visual.cfg.image_size)
train_set.transform, val_set.transform = train_transform, val_transform
torch.manual_seed(seed + rank)  # each rank draws its own Gumbel noise

# The pretrained weights are everything but the head and DTP's own modules (the boundary predictor), which
# are new. Frozen: only the new parts train. The predictor's task gradient still flows back through the
# pooling and the frozen shortened layers (plus the boundary loss). The backbone stays in train
# mode, so that the predictor samples boundaries; the ViT has no dropout or batch norm to mind.
def is_new(name):
    return name.startswith('head.') or (name.startswith('visual.') and dtp_vit.is_new(name[len('visual.'):]))


if freeze_backbone:
    for name, p in net.named_parameters():
        p.requires_grad_(is_new(name))
# AdamW groups (weight decay or not) x (new, at lr; or pretrained, at lr * backbone_lr_scale); the
# boundary predictor, new, at lr * its own lr_scale (routers.py)
groups = []
for new, lr_scale in [(True, 1.0), (False, backbone_lr_scale if pretrained else 1.0)]:
    named = [(n, p) for n, p in net.named_parameters() if is_new(n) == new]
    groups += [dict(g, lr_scale=g.get('lr_scale', 1.0) * lr_scale)
               for g in param_groups(named, weight_decay, getattr(net.visual.cfg, 'lr_scale', 1.0)) if g['params']]

val_loader = data.folder_loader(data_root, 'val', val_transform, batch_size, workers=workers) if master else None
# On shapes the objects' exact masks are known, so validation also measures how well segments follow them.
object_patches = (data.shapes_object_patches([p for p, _ in val_loader.dataset.samples], val_transform,
                                             net.visual.cfg.patch_size) if data_dir == 'shapes' and master else None)


def image_losses(logits, labels):
    """Each image's own cross-entropy, (B,), without gradient: what REINFORCE rewards (routers.py)."""
    return F.cross_entropy(logits.float().detach(), labels, reduction='none', label_smoothing=label_smoothing)


def validate():
    """Top-1/top-5 (percent) and compression on the whole val set (rank 0), and a picture of the segments."""
    m = unwrap(net)
    m.eval()
    threshold = calibrate_threshold(m.visual, val_loader, device, precision)
    before = val_loader.dataset.skipped.value  # a running count; the picture below reads a batch again
    result = dict(evaluate(m, val_loader, device, precision, object_patches,
                           shapes['groups'] if data_dir == 'shapes' else None), **threshold)
    skipped = val_loader.dataset.skipped.value - before  # unreadable val images this evaluation skipped
    if m.visual.cfg.boundary != 'none':
        save_val_segments(os.path.join(out_dir, f'boundaries_{step}.png'), m.visual, val_loader, device, precision)
    m.train()
    return dict(val_top1=result.pop('top1'), val_top5=result.pop('top5'), eval_compression=result.pop('compression'),
                val_skipped=skipped, **result)


step = ckpt['step'] if ckpt else 0
if eval_only:
    if master:
        log(dict(step=step, **validate()))
    raise SystemExit

# optimisation ----------------------------------------------------------------------------------
# A seeded sampler: the same order on resume (skipped by index, not by loading batches), and
# disjoint shards on each rank.
sampler = torch.utils.data.DistributedSampler(train_set, world_size, rank, shuffle=True, seed=seed, drop_last=True)
steps_per_epoch = len(sampler) // batch_size
if not steps_per_epoch:
    raise SystemExit(f'{data_root}/train: {len(train_set)} images, fewer than one batch of {batch_size} per rank')
total_steps = max_steps or epochs * steps_per_epoch
optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
scaler = grad_scaler(precision, device)
if ckpt is not None:
    restore_optimizer(ckpt, optimizer, scaler, log_file, master)
    del ckpt
loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
model = wrap_model(net, compile, world_size, device)


def checkpoint():
    save_run(ckpt_path, net, optimizer, scaler, step, window.get('loss', 0.0), device, world_size, master,
             epoch=step // steps_per_epoch, config=config, model_args=model_args, n_classes=len(train_set.classes),
             classes=train_set.classes, pretrained_backbone=pretrained)


log(dict(params_M=sum(p.numel() for p in net.parameters()) / 1e6,
         trainable_M=sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6, steps=total_steps,
         steps_per_epoch=steps_per_epoch, world_size=world_size, device=str(device)))
bar = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True)
model.train()
window = defaultdict(float)  # sums over the current log interval (tensors stay on the device until logged)
preempted = Preemption(world_size, device)  # SIGTERM: save after this step and exit
while step < total_steps:
    epoch, seen = divmod(step, steps_per_epoch)
    sampler.set_epoch(epoch)
    if seen:  # resumed mid-epoch: skip what the checkpointed run already trained on
        log(dict(resume_step=step, epoch=epoch, skipping_batches=seen))
    loader = torch.utils.data.DataLoader(train_set, batch_size, sampler=list(sampler)[seen * batch_size:],
                                         drop_last=True, num_workers=workers, pin_memory=device.type == 'cuda',
                                         collate_fn=data.collate, worker_init_fn=data.worker_init)
    reset_peak_memory(device)
    epoch_stats = defaultdict(float)
    batches = iter(loader)  # (draws the workers' seeds from the global RNG)
    # Random crops (workers=0) and Gumbel noise draw from the global RNG: reseeded from the step here and
    # after every step, a resumed run draws what the uninterrupted one drew (bit-exact resume).
    torch.manual_seed(step_seed(seed, rank, step))
    t0 = time.perf_counter()
    for batch in batches:
        if preempted():
            preempted.stop(checkpoint, log, step, ckpt_path)
        if batch is None:  # not a step: under DDP the other ranks would wait for this one forever
            raise SystemExit(f'{data_root}/train: every image of a batch is unreadable '
                             f'({train_set.skipped.value} skipped so far); check the data')
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        sync(device)
        t1 = time.perf_counter()
        set_lr(optimizer, cosine_lr(step, lr_decay_steps or total_steps, warmup_steps, lr, min_lr))  # x lr_scale
        with autocast(device, precision), divergence_is_an_error(net.parameters(), step, ckpt_path):
            logits, aux = model(images)
            ce = loss_fn(logits.float(), labels)
            loss = ce + boundary_loss_weight * aux['boundary_loss']
            if 'boundary_log_prob' in aux:  # routers.py's router: REINFORCE, an image's own loss rewards its cuts
                with torch.no_grad():
                    greedy = unwrap(model).head(F.normalize(aux['greedy_features'], dim=-1))
                reinforce = routers.reinforce_loss(aux, image_losses(logits, labels), image_losses(greedy, labels),
                                                   net.visual.cfg.distortion_weight)
                loss = loss + reinforce
        optimizer_step(loss, optimizer, scaler, net.parameters(), grad_clip)
        sync(device)
        t2 = time.perf_counter()
        step += 1
        torch.manual_seed(step_seed(seed, rank, step))

        if 'boundary_log_prob' in aux:
            accumulate(dict(reinforce=reinforce, distortion=aux['pooling_distortion'].mean()), window)
        accumulate(dict(loss=loss, ce=ce, boundary=aux['boundary_loss'], compression=aux['compression'],
                        step_time=t2 - t1, data_time=t1 - t0, n=1), window, epoch_stats)
        bar.update()
        if step % log_interval == 0 or step == total_steps:
            stop_if_not_finite([window['loss']], step, ckpt_path, device, world_size)
            record = interval_record(window, step, step / steps_per_epoch, optimizer.param_groups[0]['lr'],
                                     batch_size * world_size, device, train_set.skipped.value)
            log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", compression=f"{record['compression']:.2f}")
        if step % ckpt_interval == 0 and step < total_steps:
            checkpoint()
        t0 = time.perf_counter()
        if step >= total_steps:
            break
    # per epoch: the task metrics and the original DTP-ViT's efficiency metrics (step time, memory)
    n = max(1, epoch_stats['n'])
    record = dict(epoch_end=epoch, epoch=step / steps_per_epoch, step=step, train_loss=float(epoch_stats['ce']) / n,
                  train_compression=float(epoch_stats['compression']) / n,
                  avg_step_time=epoch_stats['step_time'] / n, peak_mem_gb=peak_memory_gb(device),
                  lr=optimizer.param_groups[0]['lr'])
    if master:
        log(dict(record, **validate()))
    if world_size > 1:
        dist.barrier()  # the other ranks wait while rank 0 evaluates
bar.close()
checkpoint()
finish_distributed(net.parameters(), world_size, step, log)
