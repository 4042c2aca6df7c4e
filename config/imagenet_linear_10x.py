# The frozen pretrained OpenCLIP ViT-B-32 with dynamic token pooling at 10x (about 5 segments of 49 patches) on
# ImageNet-1k: only the new boundary predictor and the head train. The original DTP-ViT's frozen 10x rows (batch
# 128, 1 epoch): 1.46% with its broken weight loading, 1.43% from scratch. config/imagenet_linear_vit.py's
# recipe and paths (set them there), with the pooling and the original's batch.
#   python train_cls.py config/imagenet_linear_10x.py               # one GPU
#   torchrun --standalone --nproc_per_node=8 train_cls.py config/imagenet_linear_10x.py --batch_size=16
exec(open('config/imagenet_linear_vit.py').read())
out_dir = 'out/cls-imagenet-linear-10x'
boundary = 'gumbel'
compression = 10.0
batch_size = 128
warmup_steps = 400
ckpt_interval = 1000
