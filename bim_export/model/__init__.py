"""The model contract both halves share: image folders, the encoder, checkpoints, backbones."""
