# From a pretrained CLIP to a faster one, stage (a), full size: ImageNet zero-shot of the pretrained OpenCLIP
# ViT-B-32 with pooling inserted after its second block, training-free (docs/pretrained.md). Set the paths marked.
#   python train_clip.py config/openclip_eval.py --boundary=none                    # OpenCLIP's own zero-shot
#   python train_clip.py config/openclip_eval.py --boundary=fixed --compression=4
#   python train_clip.py config/openclip_eval.py --boundary=none --tome_cost=0.518  # ToMe at 4x's MMACs
out_dir = 'out/openclip-eval'
init_from = 'laion2b_s34b_b79k'                    # <-- CHANGE ME offline: a local .bin/.safetensors/.pt
imagenet_val = '/path/to/imagenet/val'             # <-- CHANGE ME: ImageNet val, one folder per class
eval_only = True
workers = 8
vision = None               # the full ViT-B-32 image tower: 224 px, 32 px patches, width 768, 12 heads
text = None                 # and its text tower
short_layers = 10           # 2 + 10 blocks: ViT-B-32's 12
boundary = 'fixed'
compression = 4.0
batch_size = 256
