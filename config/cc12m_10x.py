# CLIP pretraining of DTP-ViT-B-32 at 10x (about 5 segments of 49 patches) from scratch on CC12M: the original
# DTP-ViT's 10x row (its 10x row: 13.38% zero-shot ImageNet, docs/method.md), with config/cc12m_vit.py's recipe and paths (set them there).
#   torchrun --standalone --nproc_per_node=8 train_clip.py config/cc12m_10x.py
exec(open('config/cc12m_vit.py').read())
out_dir = 'out/clip-cc12m-10x'
boundary = 'gumbel'
compression = 10.0
