# From a pretrained CLIP to a faster one, stage (b): the frozen tower of a plain CLIP checkpoint with pooling
# inserted after its second block, and a linear head (zero-shot initialised) trained on the built-in shapes
# folders, together with any new pooling weights (the paper's predictor, the router); every pretrained weight
# stays bit for bit as it was. The original DTP-ViT's "Task 1" (frozen rows) at CPU scale; the checkpoint is the
# plain demo run's (python train_clip.py config/shapes_vit.py). 125 steps: a tenth of that run's 1248.
#   python train_cls.py config/shapes_cls_probe.py --boundary=fixed --compression=4 --out_dir=out/probe-fixed4x
#   python train_cls.py config/shapes_cls_probe.py --boundary=none --tome_cost=0.518 --out_dir=out/probe-tome4x
# docs/pretrained.md runs it for every pooling, 2x/4x/10x and 3 seeds (docs/pretrained.sh).
out_dir = 'out/probe-fixed4x'
init_from = 'out/clip-shapes-vit/ckpt.pt'
freeze_backbone = True
boundary = 'fixed'
compression = 4.0
max_steps = 125
warmup_steps = 25
log_interval = 25
weight_decay = 0.0          # the zero-shot head is a good solution; do not shrink it towards zero
