# Finetuning all of the pretrained OpenCLIP ViT-B-32 (laion2b_s34b_b79k) with dynamic token pooling at
# 10x on ImageNet-1k. The original DTP-ViT's finetune 10x rows (batch 128, 1 epoch): 16.24% with its
# broken weight loading, 9.66% from scratch. Same settings as config/imagenet_finetune_vit.py except
# for the pooling and the batch.
#   python train_cls.py config/imagenet_finetune_10x.py             # one GPU
#   torchrun --standalone --nproc_per_node=8 train_cls.py config/imagenet_finetune_10x.py --batch_size=16
# Set the paths marked below (see README: classification).
out_dir = 'out/cls-imagenet-finetune-10x'
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
freeze_backbone = False
backbone_lr_scale = 0.1     # pretrained weights at 3e-5; the head and the new predictor at 3e-4
batch_size = 128
epochs = 1
lr = 3e-4
min_lr = 0.0
warmup_steps = 2000
weight_decay = 0.1
label_smoothing = 0.1
grad_clip = 1.0
precision = 'bf16'
log_interval = 50
ckpt_interval = 1000
