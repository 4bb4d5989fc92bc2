"""The caption gate (``veclip score``): each caption's image–text score under an open_clip model,
written beside the captions, and flags under a threshold that training respects."""
