# The demo with the learned router that beats fixed pooling at 10 patches per segment in raster order, with
# segments that follow the shapes (README, Results): the Gumbel predictor starts at the colour rule's cuts
# (color_prior: the colour change between neighbouring patches x a learned gain joins its logits), reads each
# patch with its change to the next (predictor_pairs), and learns by REINFORCE against the image's own top-k
# cuts (self-critical), with twice the noise, at 10x the lr; each sample's cost is its pair's contrastive loss
# plus 3x its pooling distortion. Extent embeddings on the pooled tokens. 4x pooling:
#   python train_clip.py config/shapes_pairscolor10x.py --compression=4
out_dir = 'out/clip-shapes-pairscolor10x'
boundary = 'gumbel'
compression = 10.0
train_boundaries = 'reinforce'
reinforce_baseline = 'greedy'
boundary_noise = 2.0
color_prior = 4.0
router_lr_scale = 10.0
extent_embedding = True
predictor_pairs = True
distortion_weight = 3.0
