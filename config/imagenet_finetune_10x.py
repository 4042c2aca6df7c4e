# Finetuning all of the pretrained OpenCLIP ViT-B-32 with dynamic token pooling at 10x on ImageNet-1k. The
# original DTP-ViT's finetune 10x rows (batch 128, 1 epoch): 16.24% with its broken weight loading, 9.66% from
# scratch. config/imagenet_finetune_vit.py's recipe and paths (set them there), with the pooling and the
# original's batch; the head and the new predictor train at 3e-4, the pretrained weights at 3e-5.
#   python train_cls.py config/imagenet_finetune_10x.py             # one GPU
#   torchrun --standalone --nproc_per_node=8 train_cls.py config/imagenet_finetune_10x.py --batch_size=16
exec(open('config/imagenet_finetune_vit.py').read())
out_dir = 'out/cls-imagenet-finetune-10x'
boundary = 'gumbel'
compression = 10.0
batch_size = 128
warmup_steps = 2000
ckpt_interval = 1000
