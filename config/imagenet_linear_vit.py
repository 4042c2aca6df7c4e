# Linear probe on ImageNet-1k of the frozen pretrained OpenCLIP ViT-B-32 (laion2b_s34b_b79k): the original
# DTP-ViT's frozen ViT-B-32 row (batch 512, 1 epoch; it reported 67.73% top-1, zero-shot 66.53%). The head starts
# as the zero-shot classifier (head_init='auto' with a checkpoint), so training starts from 66.53%, not chance.
#   python train_cls.py config/imagenet_linear_vit.py               # one GPU
#   torchrun --standalone --nproc_per_node=8 train_cls.py config/imagenet_linear_vit.py --batch_size=64
out_dir = 'out/cls-imagenet-linear-vit'
data_dir = '/path/to/imagenet'     # <-- CHANGE ME: ImageNet root holding train/ and val/, one folder per class
init_from = 'laion2b_s34b_b79k'    # <-- CHANGE ME offline: OpenCLIP downloads the tag; or a local .bin/.safetensors
workers = 12
vision = None               # the full ViT-B-32 image tower: 224 px, 32 px patches, width 768, 12 heads
text = None                 # and its text tower, to build the zero-shot head (then dropped)
short_layers = 10           # 2 + 10 blocks: ViT-B-32's 12
boundary = 'none'           # the plain ViT: every layer on all 1 + 49 tokens
freeze_backbone = True      # trains the head only (a plain ViT has no boundary predictor)
batch_size = 512            # per GPU: keep 512 images per step in all (e.g. 64 on 8 GPUs)
epochs = 1
min_lr = 0.0
weight_decay = 0.0          # the zero-shot head is a good solution; do not shrink it towards zero
log_interval = 50
ckpt_interval = 500
