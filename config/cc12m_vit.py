# CLIP pretraining of a plain ViT-B-32 from scratch on CC12M: the original DTP-ViT's baseline row.
#   torchrun --standalone --nproc_per_node=8 train_clip.py config/cc12m_vit.py
# Set the two paths marked below (see README: preparing CC12M and ImageNet).
out_dir = 'out/clip-cc12m-vit'
train_data = '/path/to/cc12m/{00000..01242}.tar'  # <-- CHANGE ME: img2dataset webdataset shards
train_num_samples = 7_600_000                      # <-- CHANGE ME: the samples your download holds
imagenet_val = '/path/to/imagenet/val'             # <-- CHANGE ME: ImageNet val, one folder per class
workers = 8
arch = 'ViT-B-32'
vision = None               # the full ViT-B-32 image tower: 224 px, 32 px patches, width 768, 12 heads
text = None                 # and OpenCLIP's ViT-B-32 text tower
pre_layers = 2
short_layers = 10
boundary = 'none'
batch_size = 256            # per GPU: 2048 images per step on 8 GPUs
epochs = 10
lr = 5e-4
min_lr = 0.0
warmup_steps = 2000
weight_decay = 0.1
precision = 'bf16'
eval_interval = 2000
ckpt_interval = 1000
log_interval = 50
