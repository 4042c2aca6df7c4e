# The frozen pretrained OpenCLIP ViT-B-32 (laion2b_s34b_b79k) with dynamic token pooling at 10x (about
# 5 segments of 49 patches) on ImageNet-1k: only the new boundary predictor and the head train. The
# original DTP-ViT's frozen 10x rows (batch 128, 1 epoch): 1.46% with its broken weight loading, 1.43%
# from scratch. Same settings as config/imagenet_linear_vit.py except for the pooling and the batch.
#   python train_cls.py config/imagenet_linear_10x.py               # one GPU
#   torchrun --standalone --nproc_per_node=8 train_cls.py config/imagenet_linear_10x.py --batch_size=16
# Set the paths marked below (see README: classification).
out_dir = 'out/cls-imagenet-linear-10x'
data_dir = '/path/to/imagenet'     # <-- CHANGE ME: ImageNet root holding train/ and val/, one folder per class
init_from = 'laion2b_s34b_b79k'    # <-- CHANGE ME offline: OpenCLIP downloads the tag; or a local .bin/.safetensors
workers = 12
arch = 'ViT-B-32'
vision = None
text = None
pre_layers = 2
short_layers = 10
boundary = 'gumbel'
compression = 10.0
boundary_loss_weight = 1.0
head_init = 'zeroshot'
freeze_backbone = True      # trains the head and the boundary predictor
batch_size = 128
epochs = 1
lr = 1e-3
min_lr = 0.0
warmup_steps = 400
weight_decay = 0.0
label_smoothing = 0.1
precision = 'bf16'
log_interval = 50
ckpt_interval = 1000
