# From a pretrained CLIP to a faster one, stage (c), full size: a short CLIP finetune on CC12M of the pretrained
# OpenCLIP ViT-B-32 with pooling inserted after its second block (docs/pretrained.md), config/cc12m_vit.py's
# paths (set them there) and recipe at a lower learning rate. Its zero-shot at step 0 is the training-free one.
#   torchrun --standalone --nproc_per_node=8 train_clip.py config/cc12m_finetune.py --boundary=fixed --compression=4
#   torchrun --standalone --nproc_per_node=8 train_clip.py config/cc12m_finetune.py --boundary=none --tome_cost=0.518
exec(open('config/cc12m_vit.py').read())
out_dir = 'out/clip-cc12m-finetune-4x'
init_from = 'laion2b_s34b_b79k'    # <-- CHANGE ME offline: a local .bin/.safetensors/.pt
boundary = 'fixed'
compression = 4.0
epochs = 1                  # ~3,700 steps of 2048 pairs: a short finetune, not a pretraining
lr = 1e-5
warmup_steps = 200
eval_interval = 1000        # from step 0: the training-free zero-shot first
