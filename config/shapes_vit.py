# The demo's plain-ViT baseline: no pooling, every layer on all 1 + 36 tokens.
#   python train_clip.py config/shapes_vit.py
out_dir = 'out/clip-shapes-vit'
boundary = 'none'
