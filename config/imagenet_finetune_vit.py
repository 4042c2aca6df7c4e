# Finetuning all of the pretrained OpenCLIP ViT-B-32 (laion2b_s34b_b79k) on ImageNet-1k: the original DTP-ViT's
# finetune row (batch 512, 1 epoch), which fell to 50.02% from 66.53% zero-shot (forgetting). Here the head
# starts as the zero-shot classifier (head_init='auto' with a checkpoint) and the pretrained weights train 10x
# slower than it (backbone_lr_scale=0.1: 3e-5, as in WiSE-FT's CLIP finetuning).
#   python train_cls.py config/imagenet_finetune_vit.py             # one GPU
#   torchrun --standalone --nproc_per_node=8 train_cls.py config/imagenet_finetune_vit.py --batch_size=64
out_dir = 'out/cls-imagenet-finetune-vit'
data_dir = '/path/to/imagenet'     # <-- CHANGE ME: ImageNet root holding train/ and val/, one folder per class
init_from = 'laion2b_s34b_b79k'    # <-- CHANGE ME offline: OpenCLIP downloads the tag; or a local .bin/.safetensors
workers = 12
vision = None
text = None
short_layers = 10           # 2 + 10 blocks: ViT-B-32's 12
boundary = 'none'
batch_size = 512            # per GPU: keep 512 images per step in all (e.g. 64 on 8 GPUs)
epochs = 1
lr = 3e-4
min_lr = 0.0
warmup_steps = 500
weight_decay = 0.1
log_interval = 50
ckpt_interval = 500
