"""Stage 2: train the shared Img2ST-Net decoder on cached token grids (and fine-tune end to end)."""
