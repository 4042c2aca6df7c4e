# CLIP pretraining of DTP-ViT-B-32 at 4x (about 12 segments of 49 patches) from scratch on CC12M: the original
# DTP-ViT's 4x row, with config/cc12m_vit.py's recipe and paths (set them there).
#   torchrun --standalone --nproc_per_node=8 train_clip.py config/cc12m_4x.py
exec(open('config/cc12m_vit.py').read())
out_dir = 'out/clip-cc12m-4x'
boundary = 'gumbel'
compression = 4.0
