"""The training stage: Ray Train DDP over open_clip, streaming mixed captions from Ray Data."""
