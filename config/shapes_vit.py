# The demo's plain-ViT baseline: no pooling, every layer on all 1 + 64 tokens.
#   python train_clip.py config/shapes_vit.py
out_dir = 'out/clip-shapes-vit'
boundary = 'none'
