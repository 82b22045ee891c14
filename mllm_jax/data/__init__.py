"""Data: tokenizers, conversations -> ids + loss masks, image normalisation, built-in tasks.

  tokenizer.py     demo tokenizer (built offline) and checked loading of HF tokenizers
  conversation.py  chat messages / captions -> (ids, loss_mask, turn_ids) via the chat template
  images.py        CLIP / SigLIP normalisation
  synthetic.py     the "scenes" captioning + VQA task and its fixed-shape batches
"""
