# CLIP pretraining of a plain ViT-B-32 from scratch on CC12M: the original DTP-ViT's baseline row. The recipe of
# config/cc12m_2x.py, cc12m_4x.py and cc12m_10x.py, which add the pooling. Set the three paths marked below.
#   torchrun --standalone --nproc_per_node=8 train_clip.py config/cc12m_vit.py
out_dir = 'out/clip-cc12m-vit'
train_data = '/path/to/cc12m/{00000..01242}.tar'  # <-- CHANGE ME: img2dataset webdataset shards
train_num_samples = 7_600_000                      # <-- CHANGE ME: the samples your download holds
imagenet_val = '/path/to/imagenet/val'             # <-- CHANGE ME: ImageNet val, one folder per class
workers = 8
vision = None               # the full ViT-B-32 image tower: 224 px, 32 px patches, width 768, 12 heads
text = None                 # and OpenCLIP's ViT-B-32 text tower
short_layers = 10           # 2 + 10 blocks: ViT-B-32's 12
boundary = 'none'
batch_size = 256            # per GPU: 2048 images per step on 8 GPUs
epochs = 10
lr = 5e-4
min_lr = 0.0
warmup_steps = 2000
eval_interval = 2000
ckpt_interval = 1000
log_interval = 50
