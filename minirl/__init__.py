"""minirl: a minimal pure-PyTorch reference for RL post-training of LLMs."""
