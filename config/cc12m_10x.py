# CLIP pretraining of DTP-ViT-B-32 at 10x compression (10 patches per segment) from scratch on CC12M.
#   torchrun --standalone --nproc_per_node=8 train_clip.py config/cc12m_10x.py
# Same settings as config/cc12m_vit.py except for the pooling. Set the paths marked below.
out_dir = 'out/clip-cc12m-10x'
train_data = '/path/to/cc12m/{00000..01242}.tar'  # <-- CHANGE ME: img2dataset webdataset shards
train_num_samples = 7_600_000                      # <-- CHANGE ME: the samples your download holds
imagenet_val = '/path/to/imagenet/val'             # <-- CHANGE ME: ImageNet val, one folder per class
workers = 8
arch = 'ViT-B-32'
vision = None
text = None
pre_layers = 2
short_layers = 10
boundary = 'gumbel'
compression = 10.0
boundary_loss_weight = 1.0
batch_size = 256
epochs = 10
lr = 5e-4
min_lr = 0.0
warmup_steps = 2000
weight_decay = 0.1
precision = 'bf16'
eval_interval = 2000
ckpt_interval = 1000
log_interval = 50
