"""The training half: BIM pretraining of timm ViTs (settings, data stream, model, loop, evaluation)."""
