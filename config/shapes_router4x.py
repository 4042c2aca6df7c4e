# The demo with routers.py's learned router at 4 patches per segment: its predictor reads each patch with its
# change to the next, starts at the colour rule's cuts and learns by REINFORCE against the image's own best
# cuts; segments of at least 2 patches. Its settings are RouterConfig's defaults. 10x pooling:
#   python train_clip.py config/shapes_router4x.py --compression=10
out_dir = 'out/clip-shapes-router4x'
boundary = 'router'
